"""PPO-clip policy loss, its KL term and metrics, and the entropy metric, against hand-derived numbers."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from learner.algos.advantages import ADVANTAGES, token_advantages
from learner.algos.aggregation import AGGREGATIONS
from learner.algos.policy import (
    POLICY_LOSSES,
    entropy_from_logits,
    gspo_loss,
    ppo_clip_loss,
    token_entropy,
)

LN2 = math.log(2.0)
MASK1 = torch.tensor([[0.0, 1.0]])  # one loss token at t = 1 (nothing is scored at t = 0)


def _one_token(log_ratio: float, advantage: float, **kwargs: Any) -> tuple[float, float, dict[str, float]]:
    """(loss, d loss / d logprobs, metrics) for a single loss token with the given log-ratio and advantage."""
    logprobs = torch.tensor([[0.0, log_ratio]], requires_grad=True)
    old = torch.zeros(1, 2)
    adv = torch.tensor([[0.0, advantage]])
    loss, metrics = ppo_clip_loss(logprobs, old, adv, MASK1, **kwargs)
    loss.backward()
    assert logprobs.grad is not None
    return loss.item(), logprobs.grad[0, 1].item(), metrics


def test_small_ratio_is_unclipped() -> None:
    # ratio = e^0.1 = 1.105171 inside [0.8, 1.2]: loss = -A r = -1.105171, d/dlogprob = -A r
    loss, grad, metrics = _one_token(0.1, 1.0)
    assert loss == pytest.approx(-1.105171)
    assert grad == pytest.approx(-1.105171)
    assert metrics["learner/clip_frac"] == 0.0
    assert metrics["learner/ratio_mean"] == pytest.approx(1.105171)
    # approx_kl (old || new) by k3: e^0.1 - 1 - 0.1 = 0.005171
    assert metrics["learner/approx_kl"] == pytest.approx(0.005171, abs=1e-6)
    assert metrics["learner/pg_loss"] == pytest.approx(loss)


def test_large_ratio_with_positive_advantage_is_clipped_and_has_no_gradient() -> None:
    # ratio = e^0.5 = 1.648721 > 1.2 with A = +1: max(-1.6487, -1.2) = -1.2, a constant
    loss, grad, metrics = _one_token(0.5, 1.0)
    assert loss == pytest.approx(-1.2)
    assert grad == 0.0
    assert metrics["learner/clip_frac"] == 1.0
    assert metrics["learner/clip_frac_high"] == 1.0
    assert metrics["learner/clip_frac_low"] == 0.0


def test_large_ratio_with_negative_advantage_is_not_clipped() -> None:
    # A = -1: max(1.648721, 1.2) = 1.648721, the unclipped term, so the gradient is -A r = 1.648721
    loss, grad, metrics = _one_token(0.5, -1.0)
    assert loss == pytest.approx(1.648721)
    assert grad == pytest.approx(1.648721)
    assert metrics["learner/clip_frac"] == 0.0


def test_small_ratio_with_negative_advantage_is_clipped_low() -> None:
    # ratio = e^-0.5 = 0.606531 < 0.8 with A = -1: max(0.6065, 0.8) = 0.8, a constant
    loss, grad, metrics = _one_token(-0.5, -1.0)
    assert loss == pytest.approx(0.8)
    assert grad == 0.0
    assert metrics["learner/clip_frac_low"] == 1.0


def test_clip_higher_widens_only_the_upper_bound() -> None:
    # ratio = e^0.23 = 1.258600, A = +1: clipped at 1.2 with clip_high 0.2, free under DAPO's 0.28
    assert _one_token(0.23, 1.0)[0] == pytest.approx(-1.2)
    loss, grad, _ = _one_token(0.23, 1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.258600)
    assert grad == pytest.approx(-1.258600)
    # the lower bound stays at 1 - 0.2: ratio e^-0.5 with A = -1 is still clipped to 0.8
    assert _one_token(-0.5, -1.0, clip_low=0.2, clip_high=0.28)[0] == pytest.approx(0.8)


def test_dual_clip_bounds_negative_advantage_losses() -> None:
    # ratio e^0.5 = 1.648721, A = -1: PPO loss 1.648721; dual clip c = 1.5 caps it at -A c = 1.5, constant
    loss, grad, metrics = _one_token(0.5, -1.0, clip_ratio_c=1.5)
    assert loss == pytest.approx(1.5)
    assert grad == 0.0
    assert metrics["learner/clip_frac_dual"] == 1.0
    # c = 3 is above the ratio: no effect
    assert _one_token(0.5, -1.0, clip_ratio_c=3.0)[0] == pytest.approx(1.648721)


def _batch() -> dict[str, Any]:
    # row 0: tokens 1, 2 with log-ratios 0.1, 0.5 and A = +1 -> per-token losses -1.105171, -1.2
    # row 1: token 1 with ratio 1 and A = -1                 -> per-token loss 1.0
    return {
        "logprobs": torch.tensor([[0.0, 0.1, 0.5], [0.0, -1.0, 7.0]]),
        "old_logprobs": torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.0, -3.0]]),
        "advantages": torch.tensor([[0.0, 1.0, 1.0], [0.0, -1.0, -1.0]]),
        "loss_mask": torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),
    }


def test_aggregations_hand_derived() -> None:
    batch = _batch()
    # token-mean: (-1.105171 - 1.2 + 1) / 3 = -0.435057
    loss, _ = ppo_clip_loss(**batch, aggregation="token-mean")
    assert loss.item() == pytest.approx(-0.435057, abs=1e-6)
    # seq-mean-token-mean: ((-1.105171 - 1.2) / 2 + 1) / 2 = -0.076293
    loss, _ = ppo_clip_loss(**batch, aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-0.076293, abs=1e-6)
    # clip_frac is a token mean whatever the aggregation: 1 clipped token of 3
    assert ppo_clip_loss(**batch, aggregation="seq-mean-token-mean")[1]["learner/clip_frac"] == pytest.approx(
        1 / 3
    )


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_masked_tokens_contribute_nothing(name: str) -> None:
    loss_fn = POLICY_LOSSES[name]
    batch = _batch()
    extra = {"ref_logprobs": torch.zeros(2, 3), "rollout_logprobs": torch.full((2, 3), -0.2)}
    clean_lp = batch["logprobs"].clone().requires_grad_(True)
    clean, _ = loss_fn(**{**batch, "logprobs": clean_lp}, **extra, kl_coef=0.1)
    clean.backward()
    dirty = {k: v.clone() for k, v in {**batch, **extra}.items()}
    dirty["logprobs"][1, 2] = float("inf")  # masked positions: (0, 0), (1, 0), (1, 2)
    dirty["logprobs"][0, 0] = 1e4
    dirty["old_logprobs"][1, 2] = float("nan")
    dirty["advantages"][1, 2] = 1e30
    dirty["ref_logprobs"][1, 0] = float("-inf")
    dirty["rollout_logprobs"][1, 2] = float("nan")
    dirty_lp = dirty["logprobs"].requires_grad_(True)
    loss, metrics = loss_fn(**dirty, kl_coef=0.1)
    assert loss.item() == pytest.approx(clean.item())
    assert all(math.isfinite(v) for v in metrics.values())
    loss.backward()
    assert dirty_lp.grad is not None and clean_lp.grad is not None
    torch.testing.assert_close(dirty_lp.grad, clean_lp.grad)
    assert dirty_lp.grad[1, 2] == 0.0 and dirty_lp.grad[0, 0] == 0.0


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_halves_with_global_normalisers_sum_to_the_whole(name: str, aggregation: str) -> None:
    loss_fn = POLICY_LOSSES[name]
    gen = torch.Generator().manual_seed(2)
    rows, seq = 6, 5
    mask = torch.zeros(rows, seq)
    for row, length in enumerate([1, 4, 2, 0, 3, 1]):
        mask[row, 1 : 1 + length] = 1.0
    old = -torch.rand(rows, seq, generator=gen) * 3
    logprobs = (old + 0.4 * torch.randn(rows, seq, generator=gen)).requires_grad_(True)
    tensors = {
        "old_logprobs": old,
        "advantages": torch.randn(rows, 1, generator=gen).expand(rows, seq),
        "loss_mask": mask,
        "ref_logprobs": -torch.rand(rows, seq, generator=gen) * 3,
        "rollout_logprobs": old + 0.5 * torch.randn(rows, seq, generator=gen),
    }
    kwargs: dict[str, Any] = {
        "aggregation": aggregation,
        "clip_low": 0.05,  # narrow enough that some sequence ratios (GSPO) clip too
        "clip_high": 0.06,
        "kl_coef": 0.05,
        "tis_cap": 1.5,
        "num_tokens": mask.sum(),
        "num_seqs": (mask.sum(dim=1) > 0).sum(),
        "norm_len": 8,
    }

    whole, whole_metrics = loss_fn(logprobs, **tensors, **kwargs)
    (whole_grad,) = torch.autograd.grad(whole, logprobs)
    assert whole_metrics["learner/clip_frac"] > 0 and whole_metrics["learner/tis_trunc_frac"] > 0
    total = torch.zeros(())
    summed: dict[str, float] = {}
    for part in (slice(0, 3), slice(3, 6)):  # like two micro-batches or two ranks
        loss, metrics = loss_fn(logprobs[part], **{k: v[part] for k, v in tensors.items()}, **kwargs)
        total = total + loss
        for key, value in metrics.items():
            summed[key] = summed.get(key, 0.0) + value
    (split_grad,) = torch.autograd.grad(total, logprobs)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(split_grad, whole_grad)
    assert summed.keys() == whole_metrics.keys()
    for key, value in whole_metrics.items():
        assert summed[key] == pytest.approx(value, abs=1e-6), key


def test_truncated_importance_sampling_hand_derived() -> None:
    # log-ratio 0.1, A = +1: PPO loss -e^0.1 = -1.105171, weighted by w = min(pi_old / pi_rollout, cap)
    # rollout = -ln 1.5: w = 1.5 -> -1.657756 (value and gradient); rollout = -ln 4: w = 4 -> cap 2 -> -2.210342
    for rollout, expected, truncated in ((-math.log(1.5), -1.657756, 0.0), (-math.log(4.0), -2.210342, 1.0)):
        loss, grad, metrics = _one_token(
            0.1, 1.0, rollout_logprobs=torch.tensor([[0.0, rollout]]), tis_cap=2.0
        )
        assert loss == pytest.approx(expected)
        assert grad == pytest.approx(expected)  # the weight is a constant: d/dlogprob = -A r w
        assert metrics["learner/tis_trunc_frac"] == truncated
        assert metrics["learner/tis_weight_mean"] == pytest.approx(expected / -1.105171, rel=1e-5)
    # rollout == old: weight 1, same as no correction
    assert _one_token(0.1, 1.0, rollout_logprobs=torch.zeros(1, 2))[0] == pytest.approx(-1.105171)


def test_gspo_uses_the_sequence_ratio() -> None:
    # row 0: token log-ratios 0.1, 0.3, A = +1 -> s = e^0.2 = 1.221403 on both tokens
    # row 1: one token, log-ratio -0.2, A = -1 -> s = e^-0.2 = 0.818731
    logprobs = torch.tensor([[0.0, 0.1, 0.3], [0.0, -0.2, 5.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[0.0, 1.0, 1.0], [0.0, -1.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    # wide clip, seq-mean-token-mean: (-1.221403 + 0.818731) / 2 = -0.201336
    loss, metrics = gspo_loss(logprobs, old, adv, mask, clip_low=0.3, clip_high=0.3)
    assert loss.item() == pytest.approx(-0.201336, abs=1e-6)
    # gradient of -A s / |y_i| / num_seqs: row 0 tokens -1.221403 / 2 / 2 = -0.305351; row 1: 0.818731 / 2
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.tensor([[0.0, -0.305351, -0.305351], [0.0, 0.409365, 0.0]])
    torch.testing.assert_close(grad, expected)
    # ratio_mean is the token mean of s: (1.221403 x 2 + 0.818731) / 3 = 1.087179
    assert metrics["learner/ratio_mean"] == pytest.approx(1.087179, abs=1e-6)
    # approx_kl uses the per-token ratios: k3 of 0.1, 0.3, -0.2 = 0.005171, 0.049859, 0.018731 -> mean 0.024587
    assert metrics["learner/approx_kl"] == pytest.approx(0.024587, abs=1e-6)
    # the paper's range (3e-4, 4e-4): both rows are clipped -> (-1.0004 + 0.9997) / 2, no gradient
    loss, metrics = gspo_loss(logprobs, old, adv, mask)
    assert loss.item() == pytest.approx((-1.0004 + 0.9997) / 2, abs=1e-6)
    assert metrics["learner/clip_frac"] == 1.0
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert bool((grad == 0).all())


def test_kl_term_hand_derived() -> None:
    # ratio 1 and A = 0: no policy-gradient term. pi = 0.5, pi_ref = 0.25: r = pi_ref / pi = 0.5,
    # k3 = 0.5 - 1 + ln 2 = 0.193147; loss = 0.1 x k3 = 0.019315; gradient 0.1 x (1 - r) = 0.05
    logprobs = torch.tensor([[0.0, math.log(0.5)]], requires_grad=True)
    old = logprobs.detach().clone()
    ref = torch.tensor([[0.0, math.log(0.25)]])
    loss, metrics = ppo_clip_loss(logprobs, old, torch.zeros(1, 2), MASK1, ref_logprobs=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.019315, abs=1e-6)
    assert metrics["learner/kl"] == pytest.approx(0.193147, abs=1e-6)
    loss.backward()
    assert logprobs.grad is not None and logprobs.grad[0, 1].item() == pytest.approx(0.05)
    # k1 instead: kl = ln 2 = 0.693147, gradient 0.1 x 1
    loss, metrics = ppo_clip_loss(
        logprobs, old, torch.zeros(1, 2), MASK1, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k1"
    )
    assert metrics["learner/kl"] == pytest.approx(LN2)
    assert loss.item() == pytest.approx(0.1 * LN2)


def test_kl_coefficient_zero_adds_no_gradient() -> None:
    batch = _batch()
    logprobs = batch.pop("logprobs").requires_grad_(True)
    ref = torch.tensor([[0.0, -0.3, -5.0], [0.0, -2.0, -9.0]])
    plain, _ = ppo_clip_loss(logprobs, **batch)
    (plain_grad,) = torch.autograd.grad(plain, logprobs)
    with_ref, metrics = ppo_clip_loss(logprobs, **batch, ref_logprobs=ref, kl_coef=0.0)
    (ref_grad,) = torch.autograd.grad(with_ref, logprobs)
    assert with_ref.item() == plain.item()
    torch.testing.assert_close(ref_grad, plain_grad)
    assert metrics["learner/kl"] > 0  # still measured
    assert "learner/kl_loss" not in metrics
    # and a nonzero coefficient does change the gradient
    with_kl, _ = ppo_clip_loss(logprobs, **batch, ref_logprobs=ref, kl_coef=0.1)
    (kl_grad,) = torch.autograd.grad(with_kl, logprobs)
    assert not torch.allclose(kl_grad, plain_grad)


def test_bad_arguments_raise() -> None:
    batch = _batch()
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        ppo_clip_loss(**batch, kl_coef=0.1)
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        ppo_clip_loss(**batch, kl_estimator="k4")
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(batch["logprobs"], batch["old_logprobs"], torch.zeros(2), batch["loss_mask"])
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        ppo_clip_loss(**batch, clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="unknown mode"):
        ppo_clip_loss(**batch, aggregation="sum")
    with pytest.raises(ValueError, match="tis_cap must be positive"):
        gspo_loss(**batch, rollout_logprobs=batch["old_logprobs"], tis_cap=0.0)
    with pytest.raises(ValueError, match="gspo_loss: rollout_logprobs"):
        gspo_loss(**batch, rollout_logprobs=torch.zeros(2, 2))


def test_policy_losses_table_is_called_by_keyword() -> None:
    loss, metrics = POLICY_LOSSES["ppo_clip"](**_batch(), clip_low=0.2, clip_high=0.28)
    # clip_high 0.28: ratio e^0.5 still clipped at 1.28 -> (-1.105171 - 1.28 + 1) / 3 = -0.461724
    assert loss.item() == pytest.approx(-0.461724, abs=1e-6)
    assert metrics["learner/pg_loss"] == pytest.approx(loss.item())


def test_token_entropy_hand_derived_and_aligned() -> None:
    # V = 4. logits[:, t] is the distribution that chose token t + 1, so entropy[:, t + 1] is its entropy.
    # t = 0: uniform -> ln 4 = 1.386294; t = 1: logits (ln 3, 0, -inf, -inf) -> p = (0.75, 0.25, 0, 0)
    #   -> -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335; logits[:, 2] is unused.
    neg_inf = float("-inf")
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, neg_inf, neg_inf], [9.0, neg_inf, 0.0, 0.0]]]
    )
    out = token_entropy(logits)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.386294, 0.562335]]))
    # token-mean over the mask: only t = 2 -> 0.562335; over t = 1, 2 with a global count of 4 tokens
    mask = torch.tensor([[0.0, 0.0, 1.0]])
    assert entropy_from_logits(logits, mask).item() == pytest.approx(0.562335, abs=1e-6)
    both = entropy_from_logits(logits, torch.tensor([[0.0, 1.0, 1.0]]), num_tokens=4)
    assert both.item() == pytest.approx((1.386294 + 0.562335) / 4, abs=1e-6)
    # the -inf logits give probability 0 and a zero, finite gradient
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(entropy_from_logits(logits, mask), logits)
    assert torch.isfinite(grad).all()
    assert bool((grad[0, 1, 2:] == 0).all())


def test_token_entropy_chunking_and_bf16_match_the_full_softmax() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 11, generator=gen)
    probs = torch.softmax(logits[:, :-1], dim=-1)
    full = -(probs * torch.log_softmax(logits[:, :-1], dim=-1)).sum(-1)  # (3, 5)
    for chunk_rows in (1, 4, 4096):
        out = token_entropy(logits, chunk_rows=chunk_rows)
        torch.testing.assert_close(out[:, 1:], full)
        assert bool((out[:, 0] == 0).all())
    bf16 = token_entropy(logits.bfloat16())
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16[:, 1:], full, atol=3e-2, rtol=0)


def test_entropy_gradient_matches_autograd_of_the_plain_formula() -> None:
    # dH/dz_j = -p_j (z_j - sum_k p_k z_k) for H = lse(z) - sum p z; check against the unchunked formula
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 5, generator=gen, requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    (grad,) = torch.autograd.grad(entropy_from_logits(logits, mask, chunk_rows=2), logits)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    ref = -(logp.exp() * logp).sum(-1)  # (2, 3)
    (expected,) = torch.autograd.grad((ref * mask[:, 1:]).sum() / mask.sum(), logits)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(
    ("advantage", "loss", "aggregation"),
    [
        ("grpo", "ppo_clip", "seq-mean-token-mean"),
        ("dr_grpo", "ppo_clip", "token-mean"),
        ("rloo", "gspo", "token-mean"),
    ],
)
def test_tables_compose_into_a_policy_that_learns_a_bandit(
    advantage: str, loss: str, aggregation: str
) -> None:
    # A 4-armed bandit, reward 1 for arm 2: 4 prompts x 8 samples per step, one on-policy update each.
    torch.manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)  # p(arm 2) starts at 0.25
    optimizer = torch.optim.SGD([logits], lr=1.0)
    loss_mask = torch.tensor([[0.0, 1.0]]).expand(32, 2)  # the arm is the one response token
    for _ in range(15):
        log_p = torch.log_softmax(logits, dim=0)  # (4,)
        arms = torch.multinomial(log_p.exp().detach(), 32, replacement=True)  # (B,)
        logprobs = torch.stack([torch.zeros(32), log_p[arms]], dim=1)  # (B, 2)
        rewards = (arms == 2).float().view(4, 8)  # (P, G)
        adv = token_advantages(ADVANTAGES[advantage](rewards), loss_mask)  # (B, 2)
        value, _ = POLICY_LOSSES[loss](
            logprobs, logprobs.detach(), adv, loss_mask, aggregation=aggregation, num_tokens=32, num_seqs=32
        )
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert torch.softmax(logits, dim=0)[2].item() > 0.8
