"""Outcome advantages: one scalar per response from the rewards of its group, then broadcast to tokens.

Groups are a tensor dimension: `rewards` is (P, G), the G sampled responses of each of P prompts,
and every estimator is a vectorised reduction over dim 1, with no loop over groups. Rows of the
flattened (B, T) training batch are prompt-major: row `p * G + g` holds response g of prompt p,
which is what `rewards.reshape(-1)` gives.

`ADVANTAGES` is the plain-dict table of estimators the config picks from; every entry is callable as
`fn(rewards) -> (P, G)` (optional keyword numbers have defaults). Critic-based estimators (GAE)
take per-token values and rewards instead and will get their own function and table.

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
