"""Policy-gradient losses on token logprobs, plus the policy entropy (a metric, or a bonus term).

`ppo_clip_loss` is the clipped surrogate of PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347,
eq. 7) applied per token, as GRPO uses it (Shao et al. 2024, https://arxiv.org/abs/2402.03300, eq. 3),
with an optional KL penalty against a frozen reference model added to the per-token loss (GRPO's
in-loss KL, not PPO-RLHF's KL-in-reward). The algorithm differences are numbers and table keys:

- GRPO: clip_low = clip_high = 0.2, aggregation `seq-mean-token-mean`, kl_coef > 0 with `k3`,
  advantages `grpo`;
- DAPO (Yu et al. 2025, https://arxiv.org/abs/2503.14476): clip-higher (clip_high = 0.28 > clip_low
  = 0.2), aggregation `token-mean`, kl_coef = 0;
- Dr.GRPO (Liu et al. 2025, https://arxiv.org/abs/2503.20783): aggregation `seq-mean-token-sum-norm`,
  advantages `dr_grpo`.

`gspo_loss` is GSPO (Zheng et al. 2025, https://arxiv.org/abs/2507.18071) in its GSPO-token form: the
ratio of every token of response i is s_i = exp(mean over its loss tokens of log(pi / pi_old)),
with the gradient routed through each token's own logprob, clipped with the paper's much narrower
range (3e-4, 4e-4) and aggregated `seq-mean-token-mean`, so its value and gradient are the
sequence-level objective's.

Departures from the papers:
- Ratios are exp(log-ratio) with the log-ratio clamped to +-MAX_LOG_RATIO before the exponential, so a
  stale or garbage token cannot overflow it to inf (verl clamps the same way).
- Optional dual clip (Ye et al. 2020, https://arxiv.org/abs/1912.09729): with `clip_ratio_c`, a token
  with a negative advantage loses at most `-clip_ratio_c * A`, bounding the update from very large
  ratios. Off by default.
- Optional truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly
  Brings You Off-Policy RL Training", https://fengyao.notion.site/off-policy-rl): with
  `rollout_logprobs` (the sampler's, e.g. vLLM's, logprobs, or a stale weight version's), each
  token's loss is weighted by min(pi_old / pi_rollout, tis_cap), a constant, correcting for the
  mismatch between the sampler and the learner's `old_logprobs`.
- Masked positions are replaced by neutral values before any nonlinear op, so padding holding inf or
  NaN changes neither the loss nor the gradient.

Normalisation and metrics: the loss is aggregated by `learner.algos.aggregation.aggregate` with the
GLOBAL normalisers the learner passes (`num_tokens`, `num_seqs`, `norm_len`; see that module), so
micro-batch losses sum to the whole-batch loss. Every metric except `learner/pg_loss` and
`learner/kl_loss` (aggregated like the loss) is a token mean divided by `num_tokens`, whatever the
loss aggregation, so the learner must pass `num_tokens` in every mode; each metric is then this
call's share of the global value and the learner adds the metrics of its micro-batches and ranks, as
it does for `learner/nll_sum`.

`POLICY_LOSSES` is the plain-dict table. Every entry has the same signature: tensors
`(logprobs, old_logprobs, advantages, loss_mask)` and keyword-only numbers and optional tensors
(`ref_logprobs`, `rollout_logprobs`), so the learner calls `POLICY_LOSSES[name](...)` the same way
whichever loss the config picks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from learner.algos.aggregation import Normaliser, aggregate
from learner.algos.kl import KL_ESTIMATORS

MAX_LOG_RATIO = 20.0

# Rows of logits per entropy chunk: bounds the float32 temporaries to chunk x vocab.
ENTROPY_CHUNK_ROWS = 1024

PolicyLossFn = Callable[..., tuple[Tensor, dict[str, float]]]


def _token_mean(values: Tensor, mask: Tensor, num_tokens: Normaliser) -> float:
    return aggregate(values.detach(), mask, "token-mean", num_tokens=num_tokens).item()


def _check_inputs(
    name: str,
    logprobs: Tensor,
    tensors: dict[str, Tensor | None],
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
    kl_coef: float,
    kl_estimator: str,
    tis_cap: float,
) -> None:
    for key, tensor in tensors.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name}: {key} {tuple(tensor.shape)} must match logprobs {tuple(logprobs.shape)} (B, T)"
            )
    if logprobs.dim() != 2:
        raise ValueError(f"{name}: logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"{name}: clip_low ({clip_low}) and clip_high ({clip_high}) must be >= 0")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"{name}: clip_ratio_c must be > 1 (dual clip) or None, got {clip_ratio_c}")
    if kl_coef != 0.0 and tensors.get("ref_logprobs") is None:
        raise ValueError(f"{name}: kl_coef = {kl_coef} needs ref_logprobs (the reference model's logprobs)")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"{name}: unknown kl_estimator {kl_estimator!r}; expected one of {sorted(KL_ESTIMATORS)}"
        )
    if tis_cap <= 0:
        raise ValueError(f"{name}: tis_cap must be positive, got {tis_cap}")


def _masked_log_ratio(logprobs: Tensor, other: Tensor, mask: Tensor) -> Tensor:
    """logprobs - other on loss tokens, 0 elsewhere, clamped to +-MAX_LOG_RATIO; `other` is detached."""
    log_ratio = torch.where(mask, logprobs - other.detach(), torch.zeros_like(logprobs))  # (B, T)
    return log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def _tis_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, tis_cap: float, num_tokens: Normaliser
) -> tuple[Tensor, dict[str, float]]:
    """Constant per-token weights min(pi_old / pi_rollout, tis_cap), (B, T), and their metrics."""
    with torch.no_grad():
        raw = torch.exp(_masked_log_ratio(old_logprobs, rollout_logprobs, mask))  # (B, T)
        weight = raw.clamp(max=tis_cap)  # (B, T)
        metrics = {
            "learner/tis_weight_mean": _token_mean(weight, mask, num_tokens),
            "learner/tis_trunc_frac": _token_mean((raw > tis_cap).float(), mask, num_tokens),
        }
    return weight, metrics


def _token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_estimator: str) -> Tensor:
    """Per-token KL estimate against the reference, (B, T), exactly 0 (finite gradient) off the mask."""
    ref = ref_logprobs.detach()
    return KL_ESTIMATORS[kl_estimator](torch.where(mask, logprobs, ref), ref)  # (B, T)


def _clipped_loss(
    log_ratio: Tensor,
    token_log_ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    kl_coef: float,
    kl_estimator: str,
    rollout_logprobs: Tensor | None,
    tis_cap: float,
    aggregation: str,
    num_tokens: Normaliser,
    num_seqs: Normaliser,
    norm_len: Normaliser,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate on ratio = exp(`log_ratio`), with the optional TIS weight and KL term.

    `token_log_ratio` (per-token log pi / pi_old) feeds the `learner/approx_kl` metric.
    """
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = torch.where(mask, advantages.detach(), torch.zeros_like(ratio))  # (B, T)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    pg = torch.maximum(unclipped, clipped)  # (B, T)
    if clip_ratio_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * clip_ratio_c), pg)  # (B, T)

    with torch.no_grad():
        metrics = {
            "learner/clip_frac": _token_mean((clipped > unclipped).float(), mask, num_tokens),
            "learner/clip_frac_low": _token_mean(
                ((ratio < 1 - clip_low) & (adv < 0)).float(), mask, num_tokens
            ),
            "learner/clip_frac_high": _token_mean(
                ((ratio > 1 + clip_high) & (adv > 0)).float(), mask, num_tokens
            ),
            # KL(old || new) from samples of old: Schulman's k3 with r = new / old
            "learner/approx_kl": _token_mean(
                torch.expm1(token_log_ratio) - token_log_ratio, mask, num_tokens
            ),
            "learner/ratio_mean": _token_mean(ratio, mask, num_tokens),
        }
        if clip_ratio_c is not None:
            dual = (adv < 0) & (-adv * clip_ratio_c < torch.maximum(unclipped, clipped))
            metrics["learner/clip_frac_dual"] = _token_mean(dual.float(), mask, num_tokens)

    if rollout_logprobs is not None:
        weight, tis_metrics = _tis_weights(old_logprobs, rollout_logprobs, mask, tis_cap, num_tokens)
        pg = pg * weight  # (B, T)
        metrics |= tis_metrics

    agg = {"num_tokens": num_tokens, "num_seqs": num_seqs, "norm_len": norm_len}
    loss = aggregate(pg, mask, aggregation, **agg)
    metrics["learner/pg_loss"] = loss.item()
    if ref_logprobs is not None:
        kl = _token_kl(logprobs, ref_logprobs, mask, kl_estimator)  # (B, T)
        metrics["learner/kl"] = _token_mean(kl, mask, num_tokens)
        if kl_coef != 0.0:
            kl_loss = aggregate(kl, mask, aggregation, **agg)
            metrics["learner/kl_loss"] = kl_loss.item()
            loss = loss + kl_coef * kl_loss
    return loss, metrics


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    rollout_logprobs: Tensor | None = None,
    tis_cap: float = 2.0,
    aggregation: str = "token-mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: Normaliser = None,
) -> tuple[Tensor, dict[str, float]]:
    """Per-token clipped surrogate max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) + kl_coef * KL.

    All tensors are (B, T) and aligned like `token_logprobs`; `advantages` are per token (see
    `learner.algos.advantages.token_advantages`). `old_logprobs`, `ref_logprobs` and
    `rollout_logprobs` are constants (detached); `tis_cap` is used only with `rollout_logprobs`.
    Returns `(loss, metrics)`; with `kl_coef == 0` the KL is only a metric and adds no term, so it
    cannot put NaN into the gradient.
    """
    tensors: dict[str, Tensor | None] = {
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        "loss_mask": loss_mask,
        "ref_logprobs": ref_logprobs,
        "rollout_logprobs": rollout_logprobs,
    }
    _check_inputs(
        "ppo_clip_loss", logprobs, tensors, clip_low, clip_high, clip_ratio_c, kl_coef, kl_estimator, tis_cap
    )
    mask = loss_mask != 0  # (B, T) bool
    log_ratio = _masked_log_ratio(logprobs, old_logprobs, mask)  # (B, T)
    return _clipped_loss(
        log_ratio, log_ratio, advantages, mask,
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
        logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
        kl_estimator=kl_estimator, rollout_logprobs=rollout_logprobs, tis_cap=tis_cap,
        aggregation=aggregation, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len,
    )  # fmt: skip


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    clip_ratio_c: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    rollout_logprobs: Tensor | None = None,
    tis_cap: float = 2.0,
    aggregation: str = "seq-mean-token-mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: Normaliser = None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO-token: the clipped surrogate on the sequence ratio s_i = exp(mean_t log(pi / pi_old)).

    Every token of row i carries the ratio sg[s_i] * pi_t / sg[pi_t]: the value is s_i and the
    gradient is s_i times the token's own log-prob gradient. Arguments as `ppo_clip_loss`; the
    defaults are the paper's clip range and aggregation.
    """
    tensors: dict[str, Tensor | None] = {
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        "loss_mask": loss_mask,
        "ref_logprobs": ref_logprobs,
        "rollout_logprobs": rollout_logprobs,
    }
    _check_inputs(
        "gspo_loss", logprobs, tensors, clip_low, clip_high, clip_ratio_c, kl_coef, kl_estimator, tis_cap
    )
    mask = loss_mask != 0  # (B, T) bool
    token_log_ratio = _masked_log_ratio(logprobs, old_logprobs, mask)  # (B, T)
    seq_len = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    seq_log_ratio = token_log_ratio.sum(dim=1, keepdim=True) / seq_len  # (B, 1)
    safe = torch.where(mask, logprobs, torch.zeros_like(logprobs))  # (B, T)
    # value s_i on every token, gradient through each token's own logprob
    straight = seq_log_ratio.detach() + safe - safe.detach()  # (B, T)
    log_ratio = torch.where(mask, straight, torch.zeros_like(safe))  # (B, T)
    return _clipped_loss(
        log_ratio, token_log_ratio, advantages, mask,
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
        logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
        kl_estimator=kl_estimator, rollout_logprobs=rollout_logprobs, tis_cap=tis_cap,
        aggregation=aggregation, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len,
    )  # fmt: skip


POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo_clip": ppo_clip_loss, "gspo": gspo_loss}


def token_entropy(logits: Tensor, chunk_rows: int = ENTROPY_CHUNK_ROWS) -> Tensor:
    """Entropy of the distribution each token was sampled from, float32 (B, T), 0 at t = 0.

    Aligned like `learner.algos.sft.token_logprobs`: entry t is H(softmax(logits[:, t - 1])), the
    distribution that chose `input_ids[:, t]`. Computed as logsumexp(z) - sum(softmax(z) * z) over
    chunks of rows, so the float32 temporaries are chunk x vocab. Differentiable; call it under
    `torch.no_grad()` when it is only a metric, which also frees each chunk as it goes.
    """
    if logits.dim() != 3:
        raise ValueError(f"token_entropy: logits must be (B, T, V), got shape {tuple(logits.shape)}")
    batch, seq, vocab = logits.shape
    pred = logits[:, :-1].reshape(-1, vocab)  # (B*(T-1), V)
    pieces = []
    for start in range(0, pred.shape[0], chunk_rows):
        # -inf logits (banned tokens) become the lowest float: probability 0 and 0 * z = 0, not NaN
        rows = pred[start : start + chunk_rows].float().clamp(min=torch.finfo(torch.float32).min)  # (C, V)
        lse = torch.logsumexp(rows, dim=-1, keepdim=True)  # (C, 1)
        probs = torch.exp(rows - lse)  # (C, V)
        pieces.append(lse.squeeze(1) - (probs * rows).sum(dim=-1))  # (C,)
    shifted = torch.cat(pieces) if pieces else pred.new_zeros(0, dtype=torch.float32)
    first = logits.new_zeros(batch, 1, dtype=torch.float32)
    return torch.cat([first, shifted.view(batch, seq - 1)], dim=1)  # (B, T)


def entropy_from_logits(
    logits: Tensor, loss_mask: Tensor, num_tokens: Normaliser = None, chunk_rows: int = ENTROPY_CHUNK_ROWS
) -> Tensor:
    """Token-mean policy entropy over the `loss_mask` tokens, divided by the global `num_tokens`.

    A scalar tensor; log it as `learner/entropy` (summed over micro-batches like the other metrics),
    or subtract `coef * entropy` from the loss for an entropy bonus.
    """
    if logits.shape[:2] != loss_mask.shape:
        raise ValueError(
            f"entropy_from_logits: logits {tuple(logits.shape)} must be (B, T, V) with (B, T) = loss_mask "
            f"{tuple(loss_mask.shape)}"
        )
    return aggregate(token_entropy(logits, chunk_rows), loss_mask, "token-mean", num_tokens=num_tokens)
