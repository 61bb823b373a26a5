"""Token aggregation: how a per-token loss matrix (B, T) becomes the scalar that is back-propagated.

Every RL loss computes a per-token matrix and hands it to `aggregate`, so the choice between
token-level, sequence-level and constant-length normalisation is one config string, written once
(TRL repeats it per loss). `AGGREGATIONS` is the plain-dict table of modes:

- `token-mean`: sum over all loss tokens / `num_tokens`. Every token weighs the same, so long
  responses weigh more (DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476, section 3.3).
- `seq-mean-token-mean`: mean over each sequence's loss tokens, then sum / `num_seqs`. The original
  GRPO objective (Shao et al. 2024, https://arxiv.org/abs/2402.03300, eq. 3), whose per-sequence
  1/|o_i| is the length bias that Dr.GRPO removes.
- `seq-mean-token-sum`: sum over each sequence's loss tokens, then sum / `num_seqs`.
- `seq-mean-token-sum-norm`: sum over all loss tokens / (`num_seqs` x `norm_len`), with `norm_len` a
  constant such as the generation budget. Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training", https://arxiv.org/abs/2503.20783, section 3) divides each sequence's token sum by
  that constant instead of by its own length.

Global normalisation (the property `learner.algos.sft.nll_loss` has): every mode is a sum over rows
divided by a normaliser, and the normaliser may be passed in for the GLOBAL batch (all ranks, all
micro-batches). Then the per-micro-batch results add up to the whole-batch result exactly. The
learner must pass, computed once over the global batch before it is sharded:

    num_tokens = loss_mask.sum()                      # token-mean
    num_seqs = (loss_mask.sum(dim=1) > 0).sum()       # every seq-* mode; rows without loss tokens
                                                      # contribute nothing and are not counted
    norm_len = a constant from config                 # seq-mean-token-sum-norm only

When a normaliser is omitted it is computed from this call's own `loss_mask`, which is right only for
a batch that is processed whole (one rank, one micro-batch). `norm_len` has no such default: a
per-call length (verl uses the padded width T) would change with padding and break the property.

`loss_mask` is binary (nonzero = loss token). Values at masked positions are replaced by 0 with
`torch.where` rather than multiplied by the mask, so an inf or NaN there (a padding position whose
log-ratio overflowed) cannot turn the loss into NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Normaliser = float | Tensor | None
AggregationFn = Callable[[Tensor, Tensor, Normaliser, Normaliser, Normaliser], Tensor]


def _count(given: Normaliser, local: Tensor, name: str, mode: str) -> float | Tensor:
    """The global normaliser when given (checked positive), else this call's own count (at least 1)."""
    if given is None:
        return local.clamp(min=1)
    if float(given) <= 0:
        raise ValueError(f"aggregate({mode!r}): {name} must be positive (a global count), got {float(given)}")
    return given


def _num_seqs(given: Normaliser, mask: Tensor, mode: str) -> float | Tensor:
    return _count(given, (mask.sum(dim=1) > 0).sum(), "num_seqs", mode)


def _token_mean(
    masked: Tensor, mask: Tensor, num_tokens: Normaliser, num_seqs: Normaliser, norm_len: Normaliser
) -> Tensor:
    return masked.sum() / _count(num_tokens, mask.sum(), "num_tokens", "token-mean")


def _seq_mean_token_mean(
    masked: Tensor, mask: Tensor, num_tokens: Normaliser, num_seqs: Normaliser, norm_len: Normaliser
) -> Tensor:
    seq_means = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,); rows without loss tokens give 0
    return seq_means.sum() / _num_seqs(num_seqs, mask, "seq-mean-token-mean")


def _seq_mean_token_sum(
    masked: Tensor, mask: Tensor, num_tokens: Normaliser, num_seqs: Normaliser, norm_len: Normaliser
) -> Tensor:
    return masked.sum() / _num_seqs(num_seqs, mask, "seq-mean-token-sum")


def _seq_mean_token_sum_norm(
    masked: Tensor, mask: Tensor, num_tokens: Normaliser, num_seqs: Normaliser, norm_len: Normaliser
) -> Tensor:
    mode = "seq-mean-token-sum-norm"
    if norm_len is None or float(norm_len) <= 0:
        raise ValueError(
            f"aggregate({mode!r}): norm_len must be a positive constant token count (e.g. the rollout's max "
            f"new tokens), got {norm_len}; a per-batch length would break micro-batch invariance"
        )
    return masked.sum() / (_num_seqs(num_seqs, mask, mode) * norm_len)


AGGREGATIONS: dict[str, AggregationFn] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(
    values: Tensor,
    loss_mask: Tensor,
    mode: str = "token-mean",
    *,
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    norm_len: Normaliser = None,
) -> Tensor:
    """Reduce per-token `values` (B, T) over the `loss_mask` tokens to a scalar, as `mode` says.

    Pass the global-batch normalisers (see the module docstring) whenever the batch is split over
    ranks or micro-batches; the result is then this call's share of the global value.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {sorted(AGGREGATIONS)}")
    if values.shape != loss_mask.shape or values.dim() != 2:
        raise ValueError(
            f"aggregate: values {tuple(values.shape)} and loss_mask {tuple(loss_mask.shape)} must both be (B, T)"
        )
    mask = loss_mask != 0  # (B, T) bool
    masked = torch.where(mask, values, torch.zeros_like(values))  # (B, T)
    return AGGREGATIONS[mode](masked, mask, num_tokens, num_seqs, norm_len)
