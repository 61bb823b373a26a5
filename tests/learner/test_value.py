"""`learner.algos.value`: PPO's clipped value loss, by hand."""

from __future__ import annotations

import pytest
import torch

from learner.algos import clipped_value_loss


def test_clipped_value_loss_hand_derived() -> None:
    values = torch.tensor([[0.5, 1.0]], requires_grad=True)
    old, returns, mask = torch.tensor([[0.0, 0.9]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2)
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip=0.2, num_tokens=2)
    # token 0: unclipped (0.5 - 1)^2 = 0.25, clipped 0 + 0.2 -> (0.2 - 1)^2 = 0.64 (the larger: taken)
    # token 1: unclipped (1 - 0)^2 = 1, clipped 0.9 + 0.1 -> 1.0: equal, not "clipped more"
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)
    assert metrics["critic/clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # token 0's loss is the clipped branch, flat in V there: no gradient; token 1: 0.5 * 2 * (1 - 0) / 2
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5]]))
    plain, _ = clipped_value_loss(values, old, returns, mask, clip=None, num_tokens=2)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)


def test_clipped_value_loss_counts_only_loss_tokens_and_checks_shapes() -> None:
    values = torch.tensor([[2.0, 5.0]])
    zeros, mask = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    loss, metrics = clipped_value_loss(values, zeros, zeros, mask, clip=None, num_tokens=4)
    # only token 0 counts: 0.5 * 2^2 / 4 (the masked 5.0 adds nothing)
    assert loss.item() == pytest.approx(0.5)
    assert metrics["critic/values"] == pytest.approx(2.0 / 4)
    with pytest.raises(ValueError, match="must match"):
        clipped_value_loss(values, zeros[:, :1], zeros, mask, clip=None, num_tokens=1)
