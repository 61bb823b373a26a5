"""DAPO's overlong penalty and dynamic-sampling filter against hand-derived numbers."""

from __future__ import annotations

import pytest
import torch

from learner.algos import informative_groups, overlong_penalty

NAN = float("nan")


def test_overlong_penalty_by_hand() -> None:
    lengths = torch.tensor([[2, 8, 9], [10, 11, 12]])
    # max 12, buffer 4: free up to 8 tokens, then (L - 8) / 4 of the factor 0.5: 9 -> 0.125, 12 -> 0.5
    expected = torch.tensor([[0.0, 0.0, -0.125], [-0.25, -0.375, -0.5]])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=12, buffer=4, factor=0.5), expected)
    assert overlong_penalty(torch.tensor([12]), max_len=12, buffer=12).item() == pytest.approx(-1.0)
    assert overlong_penalty(torch.tensor([0]), max_len=12, buffer=12).item() == pytest.approx(0.0)


def test_overlong_penalty_off_and_errors() -> None:
    assert torch.equal(overlong_penalty(torch.tensor([5, 12]), max_len=12, buffer=0), torch.zeros(2))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer=5)


def test_informative_groups_by_hand() -> None:
    rewards = torch.tensor([
        [1.0, 0.0, 1.0],  # mixed: kept
        [1.0, 1.0, 1.0],  # all solved: no gradient
        [0.0, 0.0, 0.0],  # none solved: no gradient
        [1.0, NAN, 0.0],  # mixed among the judged ones
        [1.0, NAN, NAN],  # a single judged sample has no baseline
        [0.5, 0.5, NAN],  # equal among the judged ones
        [-0.25, 0.0, 0.0],  # shaping alone can make a group informative
    ])
    assert informative_groups(rewards).tolist() == [True, False, False, True, False, False, True]
