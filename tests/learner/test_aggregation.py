"""Token aggregation modes against hand-derived numbers, and their global-normalisation property."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from learner.algos.aggregation import AGGREGATIONS, aggregate

VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("token-mean", {}, 25 / 3),  # (2 + 3 + 20) / 3 tokens
        ("seq-mean-token-mean", {}, 11.25),  # ((2 + 3) / 2 + 20 / 1) / 2 seqs = (2.5 + 20) / 2
        ("seq-mean-token-sum", {}, 12.5),  # ((2 + 3) + 20) / 2 seqs
        ("seq-mean-token-sum-norm", {"norm_len": 4}, 3.125),  # 25 / (2 seqs x 4)
        ("token-mean", {"num_tokens": 10}, 2.5),  # 25 / 10 global tokens
        ("seq-mean-token-mean", {"num_seqs": 5}, 4.5),  # 22.5 / 5 global seqs
        ("seq-mean-token-sum-norm", {"num_seqs": 5, "norm_len": 2}, 2.5),  # 25 / (5 x 2)
    ],
)
def test_modes_hand_derived(mode: str, kwargs: dict[str, Any], expected: float) -> None:
    assert aggregate(VALUES, MASK, mode, **kwargs).item() == pytest.approx(expected)


def test_masked_values_change_nothing_even_inf_or_nan() -> None:
    values = VALUES.clone().requires_grad_(True)
    poisoned = torch.where(MASK.bool(), VALUES, torch.tensor([float("nan")]))
    poisoned[0, 0] = float("inf")
    poisoned.requires_grad_(True)
    for mode in AGGREGATIONS:
        clean = aggregate(values, MASK, mode, norm_len=4)
        dirty = aggregate(poisoned, MASK, mode, norm_len=4)
        assert dirty.item() == pytest.approx(clean.item()), mode
        (grad,) = torch.autograd.grad(dirty, poisoned)
        assert torch.isfinite(grad).all(), mode
        assert bool((grad[~MASK.bool()] == 0).all()), mode


def test_rows_without_loss_tokens_are_not_counted_as_sequences() -> None:
    values = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    mask = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    # only row 0 has loss tokens: seq-mean-token-mean = 1 / 1, not 1 / 2
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(1.0)


def test_an_empty_mask_gives_zero_not_nan() -> None:
    values = torch.ones(2, 3, requires_grad=True)
    for mode in AGGREGATIONS:
        out = aggregate(values, torch.zeros(2, 3), mode, norm_len=3)
        assert out.item() == 0.0, mode
        out.backward()  # still attached to the graph


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_halves_with_global_normalisers_sum_to_the_whole(mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(6, 5, generator=gen)
    mask = torch.zeros(6, 5)
    for row, length in enumerate([1, 4, 2, 0, 3, 1]):  # uneven lengths, one row without loss tokens
        mask[row, 1 : 1 + length] = 1.0
    norms: dict[str, Any] = {
        "num_tokens": mask.sum(),
        "num_seqs": (mask.sum(dim=1) > 0).sum(),
        "norm_len": 8,
    }
    whole = aggregate(values, mask, mode, **norms)
    halves = aggregate(values[:3], mask[:3], mode, **norms) + aggregate(values[3:], mask[3:], mode, **norms)
    torch.testing.assert_close(halves, whole)
    # the whole batch with no normalisers passed uses its own counts, which are the global ones
    torch.testing.assert_close(aggregate(values, mask, mode, norm_len=8), whole)
    # the two halves' own means (a per-micro-batch normaliser) do not reproduce it: 7 vs 4 tokens and
    # 3 vs 2 seqs
    local = (
        aggregate(values[:3], mask[:3], mode, norm_len=8) + aggregate(values[3:], mask[3:], mode, norm_len=8)
    ) / 2
    assert not torch.allclose(local, whole)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown mode 'token-sum'"):
        aggregate(VALUES, MASK, "token-sum")
    with pytest.raises(ValueError, match=r"must both be \(B, T\)"):
        aggregate(VALUES, MASK[:, :3])
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        aggregate(VALUES, MASK, "token-mean", num_tokens=0)
    with pytest.raises(ValueError, match="num_seqs must be positive"):
        aggregate(VALUES, MASK, "seq-mean-token-mean", num_seqs=torch.tensor(0))
    with pytest.raises(ValueError, match="norm_len must be a positive constant"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm")
