"""Group advantages (GRPO, Dr.GRPO, RLOO) and their broadcast to tokens, against hand-derived numbers."""

from __future__ import annotations

import math

import pytest
import torch

from learner.algos.advantages import (
    ADVANTAGES,
    dr_grpo_advantages,
    group_advantages,
    rloo_advantages,
    token_advantages,
)

NAN = float("nan")


def test_grpo_hand_derived() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    # row 0: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    # row 1: mean 0.75, deviations (-0.75 x3, 2.25), var = (3 * 0.5625 + 5.0625) / 3 = 2.25, std 1.5
    #        -> (-0.5, -0.5, -0.5, 1.5)
    expected = torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025], [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(group_advantages(rewards, eps=0.0), expected)
    # eps is added to the std: row 1 with eps = 0.5 divides by 2.0 -> 2.25 / 2 = 1.125
    assert group_advantages(rewards, eps=0.5)[1, 3].item() == pytest.approx(1.125)


def test_grpo_matches_the_per_row_formula_on_random_groups() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 8, generator=gen)
    expected = torch.stack([(row - row.mean()) / (row.std() + 1e-6) for row in rewards])
    torch.testing.assert_close(group_advantages(rewards), expected)


def test_zero_variance_groups_give_zero_not_nan() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    for name, fn in ADVANTAGES.items():
        adv = fn(rewards)
        assert not torch.isnan(adv).any(), name
        if name == "reinforce_pp":  # its baseline is the batch mean: a solved group is above it
            assert bool((adv[0] > 0).all() and (adv[1] < 0).all()), name
            continue
        assert bool((adv[:2] == 0).all()), name
        assert bool((adv[2] != 0).all()), name  # the mixed group still gets a signal
    # eps = 0 would be 0 / 0 for a plain formula; 0.1 has no exact float, so its mean may not be 0.1
    tenths = torch.full((1, 7), 0.1)
    assert bool((group_advantages(tenths, eps=0.0) == 0).all())
    assert bool((group_advantages(tenths) == 0).all())


def test_dr_grpo_is_mean_centred_without_std() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    # r - mean: means 0.5 and 0.75
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]])
    torch.testing.assert_close(dr_grpo_advantages(rewards), expected)


def test_rloo_is_reward_minus_mean_of_the_others() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # sample 0: 1 - mean(0, 0, 1) = 2/3; sample 1: 0 - mean(1, 0, 1) = -2/3
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]])
    torch.testing.assert_close(rloo_advantages(rewards), expected)


def test_nan_rewards_are_dropped_from_the_group_stats() -> None:
    rewards = torch.tensor([[1.0, NAN, 0.0, 0.0], [NAN, 1.0, NAN, NAN]])
    # row 0 valid (1, 0, 0): mean 1/3, deviations (2/3, -1/3, -1/3), var = (4/9 + 1/9 + 1/9) / 2 = 1/3,
    #   std 0.57735 -> (1.154701, 0, -0.57735, -0.57735); the NaN sample gets 0
    # row 1 has one valid reward: no group to compare against -> all 0
    grpo = group_advantages(rewards, eps=0.0)
    torch.testing.assert_close(
        grpo, torch.tensor([[1.154701, 0.0, -0.57735, -0.57735], [0.0, 0.0, 0.0, 0.0]])
    )
    # RLOO row 0: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    rloo = rloo_advantages(rewards)
    torch.testing.assert_close(rloo, torch.tensor([[1.0, 0.0, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]))
    dr = dr_grpo_advantages(rewards)
    torch.testing.assert_close(dr, torch.tensor([[2 / 3, 0.0, -1 / 3, -1 / 3], [0.0, 0.0, 0.0, 0.0]]))


def test_token_advantages_broadcast_prompt_major_and_mask() -> None:
    adv = torch.tensor([[0.5, -0.5], [2.0, 0.0]])  # P = 2, G = 2 -> rows 0..3
    loss_mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=torch.float32)
    out = token_advantages(adv, loss_mask)
    expected = torch.tensor([[0.0, 0.5, 0.5], [0.0, -0.5, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_bad_inputs_raise_with_the_shape() -> None:
    with pytest.raises(ValueError, match=r"\(prompts, samples\)"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="floating"):
        rloo_advantages(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="rows of loss_mask"):
        token_advantages(torch.zeros(2, 2), torch.ones(3, 5))


def test_table_entries_take_rewards_only() -> None:
    assert set(ADVANTAGES) >= {"grpo", "dr_grpo", "rloo"}
    rewards = torch.tensor([[2.0, 0.0]])
    # grpo: mean 1, std sqrt(2) -> +-1/sqrt(2); dr_grpo: +-1; rloo: 2 - 0 = 2, 0 - 2 = -2
    expected = {"grpo": 1 / math.sqrt(2), "dr_grpo": 1.0, "rloo": 2.0}
    for name, value in expected.items():
        torch.testing.assert_close(
            ADVANTAGES[name](rewards), torch.tensor([[value, -value]]), atol=1e-5, rtol=0
        )


def test_reinforce_pp_hand_derived() -> None:
    from learner.algos.advantages import reinforce_pp_advantages

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    # batch mean 5/8; squared deviations sum 7.875, unbiased var 7.875 / 7 = 1.125, std 1.0606602
    dev = rewards - 0.625
    torch.testing.assert_close(reinforce_pp_advantages(rewards, eps=0.0), dev / 1.0606602)
    # a NaN is left out of the batch statistics and gets 0: the mean of (1, 0, 3) is 4/3
    got = reinforce_pp_advantages(torch.tensor([[1.0, NAN], [0.0, 3.0]]), eps=0.0)
    std = math.sqrt(((1 - 4 / 3) ** 2 + (4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 2)
    torch.testing.assert_close(got, torch.tensor([[(1 - 4 / 3) / std, 0.0], [-4 / 3 / std, (3 - 4 / 3) / std]]))
    assert torch.equal(reinforce_pp_advantages(torch.ones(2, 3)), torch.zeros(2, 3))  # no spread: 0


def test_reinforce_pp_baseline_hand_derived() -> None:
    from learner.algos.advantages import reinforce_pp_baseline_advantages

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    # centred by group: (0.5, -0.5, -0.5, 0.5) and (-0.75 x3, 2.25); their squares sum to 1 + 1.6875 +
    # 5.0625 = 7.75 over the batch, unbiased var 7.75 / 7, std 1.0522085
    centred = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]])
    torch.testing.assert_close(reinforce_pp_baseline_advantages(rewards, eps=0.0), centred / 1.0522085)
    # an all-equal group stays 0 but still counts in the batch std
    got = reinforce_pp_baseline_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), eps=0.0)
    std = math.sqrt((0.25 + 0.25) / 3)
    torch.testing.assert_close(got, torch.tensor([[0.5 / std, -0.5 / std], [0.0, 0.0]]))
    assert {"reinforce_pp", "reinforce_pp_baseline"} <= set(ADVANTAGES)
