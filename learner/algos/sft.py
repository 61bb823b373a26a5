"""Per-token log-probabilities and the supervised NLL loss (pretrain and SFT).

Pure torch, no DeepSpeed: the learner calls these on each micro-batch.

Conventions, shared with the RL losses that follow:
- `logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`, and 0 at t = 0 (nothing predicts the
  first token). So `logprobs`, `loss_mask` and `input_ids` are all aligned on the token axis, and a
  loss mask never selects column 0.
- `nll_loss` divides by `num_tokens`, the number of loss tokens in the GLOBAL batch (all ranks, all
  micro-batches), not by the micro-batch's own count. Summing the micro-batch losses over ranks and
  accumulation steps then reproduces the single-process token mean exactly, which a per-micro-batch
  mean does not when micro-batches hold different numbers of loss tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of (logits) handled per log-softmax chunk: bounds the float32 temporaries to
# chunk x vocab instead of B x T x vocab.
LOGPROB_CHUNK_ROWS = 1024


def token_logprobs(logits: Tensor, input_ids: Tensor, chunk_rows: int = LOGPROB_CHUNK_ROWS) -> Tensor:
    """log p(input_ids[:, t] | prefix) as float32 (B, T), 0 at t = 0; differentiable in `logits`.

    `logits[:, t]` is the model's prediction for token t + 1 (the Hugging Face causal-LM layout).
    Computed as `logit[target] - logsumexp(logits)` over chunks of rows, so the full (B, T, V)
    log-softmax is never materialised; bf16 logits are upcast one chunk at a time.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)} must be (B, T, V) with (B, T) = input_ids "
            f"{tuple(input_ids.shape)}"
        )
    batch, seq, vocab = logits.shape
    pred = logits[:, :-1].reshape(-1, vocab)  # (B*(T-1), V)
    targets = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    pieces = []
    for start in range(0, pred.shape[0], chunk_rows):
        rows = pred[start : start + chunk_rows].float()  # (C, V)
        picked = rows.gather(1, targets[start : start + chunk_rows, None]).squeeze(1)  # (C,)
        pieces.append(picked - torch.logsumexp(rows, dim=-1))
    shifted = torch.cat(pieces) if pieces else pred.new_zeros(0, dtype=torch.float32)
    first = logits.new_zeros(batch, 1, dtype=torch.float32)
    return torch.cat([first, shifted.view(batch, seq - 1)], dim=1)  # (B, T)


def nll_loss(
    logprobs: Tensor, loss_mask: Tensor, num_tokens: float | Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Sum of -logprobs over `loss_mask` tokens, divided by the global loss-token count `num_tokens`.

    Returns `(loss, metrics)`; every metric is this call's share of a global sum
    (`learner/nll_sum`), so callers add them up over micro-batches and ranks.
    """
    if logprobs.shape != loss_mask.shape:
        raise ValueError(
            f"nll_loss: logprobs {tuple(logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} must match"
        )
    if float(num_tokens) <= 0:
        raise ValueError(f"nll_loss: num_tokens must be positive (global loss-token count), got {num_tokens}")
    mask = loss_mask.to(logprobs.dtype)  # (B, T)
    nll_sum = -(logprobs * mask).sum()
    loss = nll_sum / num_tokens
    metrics = {"learner/nll_sum": nll_sum.item()}
    return loss, metrics
