"""The preference losses on a 2-pair batch worked out by hand, and DPO's gradient against its formula."""

from __future__ import annotations

import math

import pytest
import torch

from learner.algos import PREFERENCE_LOSSES, PairLogps, PreferenceSettings, preference_loss

# Two pairs. Policy sums (chosen, rejected): (-2, -5) and (-6, -3); response tokens (2, 4) and (3, 1);
# the reference's sums: (-3, -4) and (-5, -3).
POLICY = PairLogps(torch.tensor([-2.0, -6.0]), torch.tensor([-5.0, -3.0]), torch.tensor([2.0, 3.0]),
                   torch.tensor([4.0, 1.0]))
REFERENCE = PairLogps(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -3.0]), POLICY.chosen_tokens,
                      POLICY.rejected_tokens)


def neg_log_sigmoid(z: float) -> float:
    return math.log1p(math.exp(-z))


@pytest.mark.parametrize(
    ("name", "settings", "expected"),
    [
        # d_c, d_r = (1, -1) and (-1, 0): h = 2 and -1; beta h = 1 and -0.5.
        ("dpo", PreferenceSettings(beta=0.5), (neg_log_sigmoid(1.0) + neg_log_sigmoid(-0.5)) / 2),  # 0.64367
        # conservative DPO: 0.9 of the above plus 0.1 of the flipped labels' loss
        ("dpo", PreferenceSettings(beta=0.5, label_smoothing=0.1),
         (0.9 * neg_log_sigmoid(1.0) + 0.1 * neg_log_sigmoid(-1.0)
          + 0.9 * neg_log_sigmoid(-0.5) + 0.1 * neg_log_sigmoid(0.5)) / 2),  # 0.66867
        # hinge: max(0, 1 - 1) = 0 and max(0, 1 + 0.5) = 1.5
        ("hinge", PreferenceSettings(beta=0.5), 0.75),
        # IPO on means: pair 1 d_c = -1 - (-1.5) = 0.5, d_r = -1.25 - (-1) = -0.25, h = 0.75, (0.75 - 1)^2 = 1/16;
        # pair 2 d_c = -2 - (-5/3) = -1/3, d_r = 0, (-1/3 - 1)^2 = 16/9
        ("ipo", PreferenceSettings(beta=0.5), (1 / 16 + 16 / 9) / 2),  # 0.92014
        # SimPO, no reference: z = 0.5 (mean_c - mean_r) - 0.2 = 0.5 * 0.25 - 0.2 and 0.5 * 1 - 0.2
        ("simpo", PreferenceSettings(beta=0.5, gamma=0.2), (neg_log_sigmoid(-0.075) + neg_log_sigmoid(0.3)) / 2),
    ],
)
def test_each_loss_on_a_hand_worked_batch(name: str, settings: PreferenceSettings, expected: float) -> None:
    loss, _ = preference_loss(name, POLICY, REFERENCE, settings, num_pairs=2)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_the_table_names_every_loss_and_what_it_reads() -> None:
    assert set(PREFERENCE_LOSSES) == {"dpo", "ipo", "hinge", "simpo"}
    assert not PREFERENCE_LOSSES["simpo"].uses_reference
    assert PREFERENCE_LOSSES["ipo"].mean_over_tokens and not PREFERENCE_LOSSES["dpo"].mean_over_tokens


def test_metrics_are_the_implicit_rewards_trl_reports() -> None:
    _, metrics = preference_loss("dpo", POLICY, REFERENCE, PreferenceSettings(beta=0.5), num_pairs=2)
    # rewards beta * d: chosen (0.5, -0.5), rejected (-0.5, 0): means 0 and -0.25; pair 1 is ranked right
    assert metrics["rewards/chosen"] == pytest.approx(0.0)
    assert metrics["rewards/rejected"] == pytest.approx(-0.25)
    assert metrics["rewards/margin"] == pytest.approx(0.25)
    assert metrics["rewards/accuracy"] == pytest.approx(0.5)
    assert metrics["logps/chosen"] == pytest.approx(-4.0) and metrics["logps/rejected"] == pytest.approx(-4.0)


def test_shares_add_up_over_micro_batches_to_the_whole_batch() -> None:
    settings = PreferenceSettings(beta=0.5)
    whole, whole_metrics = preference_loss("dpo", POLICY, REFERENCE, settings, num_pairs=2)
    parts = [preference_loss("dpo", _row(POLICY, i), _row(REFERENCE, i), settings, num_pairs=2) for i in (0, 1)]
    assert float(sum(p[0] for p in parts)) == pytest.approx(float(whole))
    for key, value in whole_metrics.items():
        assert sum(p[1][key] for p in parts) == pytest.approx(value)


def _row(p: PairLogps, i: int) -> PairLogps:
    return PairLogps(p.chosen[i : i + 1], p.rejected[i : i + 1], p.chosen_tokens[i : i + 1], p.rejected_tokens[i : i + 1])


def test_dpo_gradient_matches_the_formula() -> None:
    # d loss / d logp_c = -beta (1 - sigma(beta h)) / N and d / d logp_r = +beta (1 - sigma(beta h)) / N
    beta = 0.5
    chosen = POLICY.chosen.clone().requires_grad_(True)
    rejected = POLICY.rejected.clone().requires_grad_(True)
    policy = PairLogps(chosen, rejected, POLICY.chosen_tokens, POLICY.rejected_tokens)
    loss, _ = preference_loss("dpo", policy, REFERENCE, PreferenceSettings(beta=beta), num_pairs=2)
    loss.backward()
    h = (chosen - REFERENCE.chosen) - (rejected - REFERENCE.rejected)
    expected = beta * (1 - torch.sigmoid(beta * h.detach())) / 2
    assert torch.allclose(chosen.grad, -expected)
    assert torch.allclose(rejected.grad, expected)


def test_reference_losses_refuse_to_run_without_one() -> None:
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss("dpo", POLICY, None, PreferenceSettings(), num_pairs=2)
    loss, _ = preference_loss("simpo", POLICY, None, PreferenceSettings(), num_pairs=2)
    assert torch.isfinite(loss)


def test_bradley_terry_on_a_hand_worked_batch() -> None:
    from learner.algos import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    # differences 1 and -0.5: (log(1 + e^-1) + log(1 + e^0.5)) / 2
    loss, metrics = bradley_terry_loss(chosen, rejected, num_pairs=2)
    assert float(loss) == pytest.approx((neg_log_sigmoid(1.0) + neg_log_sigmoid(-0.5)) / 2, abs=1e-6)
    assert metrics["rewards/accuracy"] == 0.5 and metrics["rewards/margin"] == pytest.approx(0.25)
    # a margin of 1 on the first pair: its term becomes -log sigma(0) = log 2
    loss, _ = bradley_terry_loss(chosen, rejected, num_pairs=2, margin=torch.tensor([1.0, 0.0]))
    assert float(loss) == pytest.approx((math.log(2) + neg_log_sigmoid(-0.5)) / 2, abs=1e-6)
