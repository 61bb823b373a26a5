"""Outcome advantages: one scalar per response from the rewards of its group, then broadcast to tokens.

Groups are a tensor dimension: `rewards` is (P, G), the G sampled responses of each of P prompts,
and every estimator is a vectorised reduction over dim 1, with no loop over groups. Rows of the
flattened (B, T) training batch are prompt-major: row `p * G + g` holds response g of prompt p,
which is what `rewards.reshape(-1)` gives.

`ADVANTAGES` is the plain-dict table of outcome estimators; every entry is callable as
`fn(rewards) -> (P, G)` (optional keyword numbers have defaults). The loop picks from `ESTIMATORS`, one
signature for all: `fn(token_rewards (B, T), loss_mask (B, T), values (B, T) | None, *, group_size,
gamma, lam) -> (advantages (B, T), returns (B, T) | None)`. Token rewards carry the outcome on each
response's last token and, with a KL reward penalty, `-coef * KL` on every response token
(`token_rewards`); an outcome estimator sums them per response, `gae` runs over them with the critic.

- `grpo`: (r - mean) / (std + eps) within the group. GRPO, Shao et al. 2024, "DeepSeekMath"
  (https://arxiv.org/abs/2402.03300), section 4.1.2 (outcome supervision). std is the unbiased
  (n - 1) sample std, as `torch.std` and verl compute it.
- `dr_grpo`: r - mean, no std division. Dr.GRPO, Liu et al. 2025, "Understanding R1-Zero-Like
  Training" (https://arxiv.org/abs/2503.20783), section 3: dividing by the std up-weights groups
  that are nearly all right or all wrong (question-difficulty bias).
- `rloo`: r_i minus the mean of the OTHER G - 1 rewards, which equals G / (G - 1) * (r_i - mean).
  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs" (https://arxiv.org/abs/2402.14740).
- `reinforce_pp`: REINFORCE++ without a critic, Hu 2025 (https://arxiv.org/abs/2501.03262): the
  baseline is the mean reward of the whole batch and advantages are whitened by the batch std, so no
  group structure is needed (our loop has no per-token KL reward yet: the outcome is the return).
- `gae`: PPO's critic-based estimator. Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation" (https://arxiv.org/abs/1506.02438): delta_t = r_t + gamma V_{t+1}
  - V_t, A_t = sum_l (gamma lam)^l delta_{t+l} over the response, V = 0 after its last token;
  returns A + V train the critic; advantages are whitened over the batch's response tokens (as verl and
  OpenRLHF do).
- `reinforce_pp_baseline`: the group-sampling variant of the same paper (OpenRLHF's
  "reinforce_baseline"): r - group mean, divided by the std of those values over the whole batch,
  which avoids GRPO's per-group std (difficulty) bias while keeping the scale stable.

Departures from the papers:
- A group whose rewards are all equal (or that has fewer than two valid rewards) gets advantage
  exactly 0 everywhere, never NaN, even with eps = 0 and even when float rounding of its mean leaves
  a residue that 1 / eps would otherwise amplify.
- NaN in `rewards` marks a sample the verifier could not judge (`Verdict.score is None`). It is left
  out of its group's mean and std and its own advantage is 0, so groups may be ragged without a
  Python loop. The engine should still drop such rows from the training batch (or zero their
  loss_mask): an advantage of 0 contributes no gradient but its tokens would still be counted by
  `token-mean`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

AdvantageFn = Callable[..., Tensor]


def _check_rewards(rewards: Tensor, name: str) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"{name}: rewards must be (prompts, samples), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(
            f"{name}: rewards must be a floating tensor (NaN marks a dropped sample), got {rewards.dtype}"
        )


def _group_stats(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count (P, 1), centred r - mean (P, G), unbiased std (P, 1)) over the non-NaN rewards.

    `centred` is exactly 0 at NaN rewards and in groups whose valid rewards are all equal (where
    float rounding of the mean could otherwise leave ~1e-8 residues that eps would blow up).
    """
    valid = ~torch.isnan(rewards)  # (P, G)
    filled = torch.where(valid, rewards, torch.zeros_like(rewards))  # (P, G)
    count = valid.sum(dim=1, keepdim=True).to(rewards.dtype)  # (P, 1)
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1)  # (P, 1)
    inf = torch.full_like(rewards, math.inf)
    low = torch.where(valid, rewards, inf).amin(dim=1, keepdim=True)  # (P, 1)
    high = torch.where(valid, rewards, -inf).amax(dim=1, keepdim=True)  # (P, 1)
    informative = valid & (high > low)  # (P, G): a valid sample in a group with some spread
    centred = torch.where(informative, rewards - mean, torch.zeros_like(rewards))  # (P, G)
    var = centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)  # (P, 1)
    return count, centred, var.sqrt()


def group_advantages(rewards: Tensor, eps: float = 1e-6, scale_by_std: bool = True) -> Tensor:
    """GRPO: (r - group mean) / (group std + eps), (P, G) -> (P, G); `scale_by_std=False` is Dr.GRPO."""
    _check_rewards(rewards, "group_advantages")
    _, centred, std = _group_stats(rewards)
    if not scale_by_std:
        return centred
    # a degenerate group has centred == 0 and std == 0; keep it 0 even when eps == 0
    return centred / torch.where(std > 0, std + eps, torch.ones_like(std))  # (P, G)


def dr_grpo_advantages(rewards: Tensor) -> Tensor:
    """Dr.GRPO: r - group mean, (P, G) -> (P, G)."""
    return group_advantages(rewards, scale_by_std=False)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO: r_i - mean of the other valid rewards of the group, (P, G) -> (P, G); 0 if it has none."""
    _check_rewards(rewards, "rloo_advantages")
    count, centred, _ = _group_stats(rewards)
    # r_i - (n * mean - r_i) / (n - 1) = n / (n - 1) * (r_i - mean); n <= 1 has centred == 0
    return centred * count / (count - 1).clamp(min=1)  # (P, G)


def _batch_whiten(values: Tensor, valid: Tensor, eps: float, centre: bool) -> Tensor:
    """`values` (P, G) divided by their unbiased std over the valid entries of the whole batch (minus
    their batch mean first when `centre`); invalid entries and a batch without spread give 0."""
    count = valid.sum().clamp(min=1)
    filled = torch.where(valid, values, torch.zeros_like(values))
    mean = filled.sum() / count if centre else torch.zeros((), dtype=values.dtype)
    dev = torch.where(valid, values - mean, torch.zeros_like(values))
    std = (dev.square().sum() / (count - 1).clamp(min=1)).sqrt()
    return dev / (std + eps) if std > 0 else torch.zeros_like(values)


def reinforce_pp_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++: (r - batch mean) / (batch std + eps), (P, G) -> (P, G); NaN rewards get 0."""
    _check_rewards(rewards, "reinforce_pp_advantages")
    return _batch_whiten(rewards, ~torch.isnan(rewards), eps, centre=True)


def reinforce_pp_baseline_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++-baseline: (r - group mean) / (batch std of those + eps), (P, G) -> (P, G)."""
    _check_rewards(rewards, "reinforce_pp_baseline_advantages")
    _, centred, _ = _group_stats(rewards)  # each group's centred values sum to 0: the batch mean is 0
    return _batch_whiten(centred, ~torch.isnan(rewards), eps, centre=False)


ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": group_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}


def token_advantages(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Broadcast per-response advantages, (P, G) or (B,), to the tokens of the (B, T) batch.

    Row b of `loss_mask` is response `advantages.reshape(-1)[b]` (prompt-major). Positions outside
    the loss mask get 0.
    """
    flat = advantages.reshape(-1)  # (B,)
    if flat.shape[0] != loss_mask.shape[0] or loss_mask.dim() != 2:
        raise ValueError(
            f"token_advantages: {flat.shape[0]} advantages (from shape {tuple(advantages.shape)}) must "
            f"match the rows of loss_mask {tuple(loss_mask.shape)} (B = prompts x samples, prompt-major)"
        )
    tokens = flat[:, None].expand(loss_mask.shape)  # (B, T)
    return torch.where(loss_mask != 0, tokens, torch.zeros_like(tokens))


def token_rewards(rewards: Tensor, loss_mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards (B, T): each response's outcome `rewards` (B,) on its last loss token, minus
    `kl_coef * kl` on every loss token (KL as a reward penalty; `kl` (B, T) is e.g. k1 against the
    reference). A NaN outcome (or a row without loss tokens) makes the whole row NaN."""
    mask = (loss_mask != 0).to(torch.float32)  # (B, T)
    if rewards.shape != mask.shape[:1] or (kl is not None and kl.shape != mask.shape):
        raise ValueError(f"token_rewards: rewards {tuple(rewards.shape)} and kl {None if kl is None else tuple(kl.shape)} "
                         f"must be (B,) and (B, T) for loss_mask {tuple(mask.shape)}")
    positions = torch.arange(mask.shape[1], dtype=torch.float32)  # (T,)
    last = (mask * (positions + 1)).argmax(dim=1)  # (B,) the last loss token of each row
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0]), last] = torch.nan_to_num(rewards.float(), nan=0.0)
    out = out * mask
    if kl is not None and kl_coef:
        out = out - kl_coef * kl.float() * mask
    dropped = torch.isnan(rewards) | (mask.sum(dim=1) == 0)  # (B,)
    return out.masked_fill(dropped[:, None], float("nan"))


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values - mean) / std over the positions where `mask` is set (unbiased std); 0 elsewhere."""
    sel = mask != 0
    count = sel.sum().clamp(min=1)
    mean = torch.where(sel, values, 0.0).sum() / count
    dev = torch.where(sel, values - mean, 0.0)
    std = (dev.square().sum() / (count - 1).clamp(min=1)).sqrt()
    return dev / (std + eps)


def gae_advantages(
    token_rewards: Tensor, values: Tensor, loss_mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """GAE over the response tokens of each row: (advantages (B, T), returns (B, T)), both 0 off the mask.

    `values[:, t]` is the critic's value of the state before token t (the learner's alignment: the
    value read from position t - 1, like the logits that score token t). NaN rows (dropped samples)
    get 0 everywhere.
    """
    if not (token_rewards.shape == values.shape == loss_mask.shape) or values.dim() != 2:
        raise ValueError(f"gae_advantages: token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} "
                         f"and loss_mask {tuple(loss_mask.shape)} must share one (B, T) shape")
    mask = (loss_mask != 0).to(values.dtype)  # (B, T)
    rewards = torch.nan_to_num(token_rewards.to(values.dtype), nan=0.0) * mask
    values = values * mask
    rows, width = mask.shape
    advantages = torch.zeros_like(values)
    running = torch.zeros(rows, dtype=values.dtype)  # A_{t+1}, within the response
    zero = torch.zeros(rows, dtype=values.dtype)
    for t in reversed(range(width)):
        inside_next = mask[:, t + 1] if t + 1 < width else zero  # token t+1 is still the response
        next_value = values[:, t + 1] * inside_next if t + 1 < width else zero
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * inside_next * running
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def _outcome_estimator(fn: AdvantageFn) -> Callable[..., tuple[Tensor, None]]:
    def estimate(token_rewards: Tensor, loss_mask: Tensor, values: Tensor | None = None, *,
                 group_size: int, **_: float) -> tuple[Tensor, None]:
        outcome = token_rewards.sum(dim=1)  # (B,): NaN for dropped rows, which the estimators leave out
        return token_advantages(torch.nan_to_num(fn(outcome.view(-1, group_size)), nan=0.0), loss_mask), None
    estimate.__doc__ = f"{fn.__name__} on each response's summed token rewards, broadcast to its tokens."
    return estimate


def gae_estimator(token_rewards: Tensor, loss_mask: Tensor, values: Tensor | None = None, *,
                  gamma: float = 1.0, lam: float = 0.95, **_: float) -> tuple[Tensor, Tensor]:
    """`gae_advantages` with the advantages whitened over the batch's response tokens."""
    if values is None:
        raise ValueError("rl.advantage=gae needs the critic's values: set learner.critic.enabled=true (algo=ppo)")
    advantages, returns = gae_advantages(token_rewards, values, loss_mask, gamma, lam)
    return masked_whiten(advantages, loss_mask) * (loss_mask != 0), returns


ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor | None]]] = {
    **{name: _outcome_estimator(fn) for name, fn in ADVANTAGES.items()},
    "gae": gae_estimator,
}
