"""KL estimators k1, k2, k3 (Schulman 2020) against hand-derived numbers, direction and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from learner.algos.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3

LN2 = math.log(2.0)


def test_values_for_hand_picked_ratios() -> None:
    # token 0: pi = 0.5, pi_ref = 0.25 -> r = pi_ref / pi = 0.5, log r = -ln 2
    # token 1: pi = 0.25, pi_ref = 0.5 -> r = 2, log r = +ln 2
    logprobs = torch.log(torch.tensor([[0.5, 0.25]]))
    ref_logprobs = torch.log(torch.tensor([[0.25, 0.5]]))
    # k1 = -log r = (ln 2, -ln 2) = (0.693147, -0.693147)
    torch.testing.assert_close(kl_k1(logprobs, ref_logprobs), torch.tensor([[LN2, -LN2]]))
    # k2 = (log r)^2 / 2 = 0.480453 / 2 = 0.240227 for both
    torch.testing.assert_close(kl_k2(logprobs, ref_logprobs), torch.tensor([[0.240227, 0.240227]]))
    # k3 = (r - 1) - log r: 0.5 - 1 + 0.693147 = 0.193147; 2 - 1 - 0.693147 = 0.306853
    torch.testing.assert_close(kl_k3(logprobs, ref_logprobs), torch.tensor([[0.193147, 0.306853]]))


def test_direction_is_kl_of_policy_from_reference() -> None:
    # Categorical pi = (0.5, 0.25, 0.25), pi_ref = (0.25, 0.25, 0.5).
    # KL(pi || pi_ref) = 0.5 ln 2 + 0 + 0.25 ln 0.5 = 0.25 ln 2 = 0.173287.
    # The other direction KL(pi_ref || pi) = 0.25 ln 0.5 + 0.5 ln 2 = 0.25 ln 2 too, so tell them apart by
    # k3 with the ratio flipped: E_pi[pi / pi_ref - 1 - log(pi / pi_ref)] = 1.375 - 1 - 0.173 = 0.201713.
    pi = torch.tensor([[0.5, 0.25, 0.25]])
    ref = torch.tensor([[0.25, 0.25, 0.5]])
    for name in ("k1", "k3"):  # unbiased: the expectation under pi (the sampler) is the exact KL
        expectation = (pi * KL_ESTIMATORS[name](pi.log(), ref.log())).sum()
        assert expectation.item() == pytest.approx(0.25 * LN2, abs=1e-6), name
        flipped = (pi * KL_ESTIMATORS[name](ref.log(), pi.log())).sum()
        assert flipped.item() != pytest.approx(0.25 * LN2, abs=1e-3), name


def test_k2_and_k3_are_nonnegative_and_zero_at_equality() -> None:
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 9, generator=gen) * 5
    ref_logprobs = -torch.rand(4, 9, generator=gen) * 5
    assert bool((kl_k2(logprobs, ref_logprobs) >= 0).all())
    assert bool((kl_k3(logprobs, ref_logprobs) >= 0).all())
    assert (kl_k1(logprobs, ref_logprobs) < 0).any()  # k1 is only nonnegative in expectation
    for fn in KL_ESTIMATORS.values():
        assert bool((fn(logprobs, logprobs) == 0).all())


def test_gradients_flow_through_logprobs_only() -> None:
    # pi = 0.5, pi_ref = 0.25, log r = -ln 2, r = 0.5
    # d k1 / d logprobs = 1; d k2 / d logprobs = -log r = ln 2; d k3 / d logprobs = 1 - r = 0.5
    expected = {"k1": 1.0, "k2": LN2, "k3": 0.5}
    for name, grad in expected.items():
        logprobs = torch.tensor([[math.log(0.5)]], requires_grad=True)
        ref_logprobs = torch.tensor([[math.log(0.25)]], requires_grad=True)
        KL_ESTIMATORS[name](logprobs, ref_logprobs).sum().backward()
        assert logprobs.grad is not None and logprobs.grad.item() == pytest.approx(grad), name
        assert ref_logprobs.grad is None, name  # the reference model is frozen


def test_k3_stays_finite_for_extreme_ratios() -> None:
    # log r = 0 - (-100) = 100 would overflow exp in float32; clamped to 20: e^20 - 1 - 20
    logprobs = torch.tensor([[-100.0]], requires_grad=True)
    out = kl_k3(logprobs, torch.tensor([[0.0]]))
    assert out.item() == pytest.approx(math.exp(20.0) - 21.0, rel=1e-6)
    out.sum().backward()
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="kl_k2: logprobs"):
        kl_k2(torch.zeros(2, 3), torch.zeros(2, 4))
