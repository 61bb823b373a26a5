"""PPO's pieces against hand-derived numbers: per-token rewards with a KL penalty, GAE, whitening, the
estimator table, and the clipped value loss."""

from __future__ import annotations

import pytest
import torch

from learner.algos import (
    ESTIMATORS,
    gae_advantages,
    group_advantages,
    masked_whiten,
    token_advantages,
    token_rewards,
)

NAN = float("nan")
# one prompt token, then three response tokens at positions 1..3
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
VALUES = torch.tensor([[0.0, 0.5, 0.6, 0.8]])
OUTCOME = torch.tensor([[0.0, 0.0, 0.0, 1.0]])


def test_token_rewards_put_the_outcome_last_and_the_kl_penalty_everywhere() -> None:
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    kl = torch.full((3, 4), 0.5)
    out = token_rewards(torch.tensor([1.0, 0.0, NAN]), mask, kl, kl_coef=0.1)
    torch.testing.assert_close(out[:2], torch.tensor([[0.0, -0.05, 0.95, 0.0], [0.0, -0.05, 0.0, 0.0]]))
    assert torch.isnan(out[2]).all()  # an unjudged sample stays out of everything
    torch.testing.assert_close(token_rewards(torch.tensor([1.0]), MASK), OUTCOME)  # no KL: the outcome only


@pytest.mark.parametrize(
    ("gamma", "lam", "advantages"),
    [
        # lam = 1, gamma = 1: A_t = R - V_t (Monte Carlo): 1 - 0.5, 1 - 0.6, 1 - 0.8
        (1.0, 1.0, [0.5, 0.4, 0.2]),
        # lam = 0.5: delta = (0.6 - 0.5, 0.8 - 0.6, 1 - 0.8) = (0.1, 0.2, 0.2);
        # A3 = 0.2, A2 = 0.2 + 0.5 * 0.2 = 0.3, A1 = 0.1 + 0.5 * 0.3 = 0.25
        (1.0, 0.5, [0.25, 0.3, 0.2]),
        # gamma = 0.5, lam = 1: A_t = 0.5^(3-t) * 1 - V_t = (0.25 - 0.5, 0.5 - 0.6, 1 - 0.8)
        (0.5, 1.0, [-0.25, -0.1, 0.2]),
    ],
)
def test_gae_hand_derived(gamma: float, lam: float, advantages: list[float]) -> None:
    adv, returns = gae_advantages(OUTCOME, VALUES, MASK, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, *advantages]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, *advantages]]) + VALUES * MASK)


def test_gae_rows_are_independent_and_padding_and_dropped_rows_are_zero() -> None:
    # row 1 is row 0 shifted right by a longer prompt and cut short by padding on the right
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [NAN] * 5])
    values = torch.tensor([[0.0, 0.5, 0.6, 0.8, 9.0], [9.0, 0.0, 0.5, 0.6, 0.8], [1.0] * 5])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0], [0.0] * 5])
    adv, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv[0, 1:4], torch.tensor([0.25, 0.3, 0.2]))
    torch.testing.assert_close(adv[1, 2:5], torch.tensor([0.25, 0.3, 0.2]))
    assert adv[2].abs().sum() == 0 and returns[2].abs().sum() == 0
    assert adv[0, 4] == 0 and adv[1, :2].abs().sum() == 0  # nothing outside the response


def test_masked_whiten() -> None:
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0]])
    # over (1, 2, 3): mean 2, unbiased std 1
    torch.testing.assert_close(masked_whiten(values, MASK, eps=0.0), torch.tensor([[0.0, -1.0, 0.0, 1.0]]))


def test_outcome_estimators_sum_token_rewards_per_response() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, NAN]])  # (P=1, G=4)
    mask = torch.ones(4, 3)
    mask[:, 0] = 0
    mask[3] = 0  # the unjudged sample has no loss token
    adv, returns = ESTIMATORS["grpo"](token_rewards(rewards.flatten(), mask), mask, None, group_size=4)
    assert returns is None
    torch.testing.assert_close(adv, token_advantages(torch.nan_to_num(group_advantages(rewards)), mask))
    # a KL penalty lowers each response's summed reward by coef x its summed KL: here only response 0 has KL
    kl = torch.zeros(4, 3)
    kl[0] = 1.0
    penalised = token_rewards(rewards.flatten(), mask, kl, kl_coef=0.25)  # response 0: 1 - 0.25 x 2 = 0.5
    adv, _ = ESTIMATORS["grpo"](penalised, mask, None, group_size=4)
    torch.testing.assert_close(adv, token_advantages(group_advantages(torch.tensor([[0.5, 0.0, 0.0, NAN]])), mask))


def test_gae_estimator_whitens_and_needs_values() -> None:
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 0.0]), mask)
    values = torch.full((2, 4), 0.3)
    adv, returns = ESTIMATORS["gae"](rewards, mask, values, group_size=2, gamma=1.0, lam=1.0)
    raw, raw_returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, masked_whiten(raw, mask) * mask)
    torch.testing.assert_close(returns, raw_returns)
    assert float(adv[mask != 0].mean()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="learner.critic.enabled"):
        ESTIMATORS["gae"](rewards, mask, None, group_size=2)
