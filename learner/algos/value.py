"""The critic's loss: PPO's clipped value loss on the response tokens.

    clipped_t = V_old_t + clip(V_t - V_old_t, -clip, +clip)
    loss = sum_t mask_t * 0.5 * max((V_t - R_t)^2, (clipped_t - R_t)^2) / num_tokens

(Schulman et al. 2017 as implemented in OpenAI's baselines and used by verl and OpenRLHF): the value
may not move further than `clip` from the value it had when the batch was scored unless that lowers
the loss anyway. `R` are the GAE returns (`learner.algos.advantages.gae_advantages`). `num_tokens` is
the GLOBAL loss-token count of the minibatch, so the micro-batch losses of all ranks sum to the
minibatch's token mean, as in the policy losses. `clip=None` is the plain squared error.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, loss_mask: Tensor, clip: float | None, num_tokens: float
) -> tuple[Tensor, dict[str, float]]:
    """(loss, metrics) for values, old_values, returns and loss_mask of one (b, T) shape; metrics are
    this call's shares of the minibatch's token means (`critic/value_loss`, `critic/clip_frac`,
    `critic/values`, `critic/returns`)."""
    if not (values.shape == old_values.shape == returns.shape == loss_mask.shape):
        raise ValueError(f"clipped_value_loss: values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, "
                         f"returns {tuple(returns.shape)} and loss_mask {tuple(loss_mask.shape)} must match")
    mask = (loss_mask != 0).to(values.dtype)
    returns, old_values = returns.detach(), old_values.detach()
    unclipped = (values - returns).square()
    if clip is None:
        worst, clipped_more = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped_err = (clipped - returns).square()
        worst, clipped_more = torch.maximum(unclipped, clipped_err), clipped_err > unclipped
    loss = 0.5 * (worst * mask).sum() / num_tokens

    def share(x: Tensor) -> float:
        return float((x.detach().to(mask.dtype) * mask).sum() / num_tokens)

    return loss, {"critic/value_loss": float(loss.detach()), "critic/clip_frac": share(clipped_more),
                  "critic/values": share(values), "critic/returns": share(returns)}
