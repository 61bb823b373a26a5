"""The learner's RL call path with real DeepSpeed on CPU: `LearnerWorker.train_rl_step` without Ray,
and `LearnerGroup.train_rl_step` over 2 Ray actors reproducing 1 rank.

Batches are random tokens on the tiny 2-layer Llama; advantages are one number per row broadcast over
its loss tokens (as the engine does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from learner.algos import entropy_from_logits
from learner.config import CriticConfig, LearnerConfig, validate
from learner.group import LearnerGroup, free_port
from learner.worker import LearnerWorker
from tests.learner.conftest import make_batch

pytestmark = pytest.mark.slow

BASE: dict[str, Any] = {
    "lr": 1e-2,
    "lr_schedule": "constant",
    "batch_size": 4,
    "micro_batch_size": 2,
    "seed": 0,
}


def rl_batch(
    rows: int, seed: int, row_advantages: list[float], pad_right: int = 3
) -> dict[str, torch.Tensor]:
    batch = make_batch(rows, seed=seed, pad_right=pad_right)
    adv = torch.tensor(row_advantages, dtype=torch.float32)[:, None]  # (B, 1)
    batch["loss_mask"] = batch["loss_mask"].float()
    batch["advantages"] = adv * batch["loss_mask"]  # (B, T), 0 off the mask
    return batch


def new_worker(model_dir: str, **overrides: Any) -> LearnerWorker:
    cfg = LearnerConfig(**(BASE | overrides))
    return LearnerWorker(cfg, model_dir, rank=0, world_size=1, total_steps=50, master_port=free_port())


@pytest.fixture(scope="module")
def worker(tiny_model_dir: str) -> Iterator[LearnerWorker]:
    """kl_coef = 0, one epoch: each call on 4 rows is one minibatch, one optimizer step."""
    w = new_worker(tiny_model_dir)
    yield w
    w.close()


def row_mean_logprobs(worker: LearnerWorker, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["loss_mask"]
    return (worker.logprobs(batch) * mask).sum(1) / mask.sum(1)  # (B,)


# ---- pure helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("policy_loss", "nope"),
        ("kl_estimator", "k9"),
        ("aggregation", "mean"),
        ("clip_ratio_c", 1.0),
        ("kl_coef", -0.1),
        ("ppo_epochs", 0),
        ("tis_cap", 0.0),
        ("norm_len", 0),
        ("old_logprobs", "vllm"),
    ],
)
def test_rl_config_errors_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"LearnerConfig.{field}"):
        validate(LearnerConfig(**{field: value}), world_size=1)


def test_dr_grpo_aggregation_needs_norm_len() -> None:
    with pytest.raises(ValueError, match="LearnerConfig.norm_len"):
        validate(LearnerConfig(aggregation="seq-mean-token-sum-norm"), world_size=1)
    validate(LearnerConfig(aggregation="seq-mean-token-sum-norm", norm_len=64), world_size=1)


# ---- one rank, no Ray ----------------------------------------------------------------------------


def test_first_minibatch_has_ratio_one_and_no_reference(worker: LearnerWorker) -> None:
    # rows 0, 2 have 15 loss tokens, rows 1, 3 have 12 (3 padding + column 0)
    batch = rl_batch(4, seed=1, row_advantages=[1.0, -1.0, 0.5, 0.0])
    metrics = worker.train_rl_step(batch)
    # ratio = 1 everywhere: nothing clipped, no divergence from old
    assert metrics["learner/clip_frac"] == 0.0
    assert metrics["learner/approx_kl"] == pytest.approx(0.0, abs=1e-7)
    # token-mean of -A * 1: -(15 * 1 - 12 * 1 + 15 * 0.5 + 0) / 54 = -10.5 / 54
    assert metrics["learner/pg_loss"] == pytest.approx(-10.5 / 54, rel=1e-6)
    assert metrics["learner/loss"] == pytest.approx(-10.5 / 54, rel=1e-6)
    assert metrics["learner/optimizer_steps"] == 1
    # row 3 (A = 0) adds nothing to the gradient and is left out: 15 + 12 + 15 tokens trained
    assert metrics["learner/tokens"] == 42
    assert metrics["learner/skipped_rows_frac"] == 0.25
    assert metrics["learner/grad_norm"] > 0
    # kl_coef = 0: no reference model was built, so none ran, and no KL is reported
    assert worker.reference is None
    assert "learner/kl" not in metrics
    # no rollout_logprobs given: no mismatch metric
    assert "learner/logprob_diff" not in metrics
    # random init, vocab 256: the entropy is close to log(256) ~ 5.545 and cannot exceed it
    assert 5.0 < metrics["learner/entropy"] <= math.log(256) + 1e-5


def test_advantage_sign_moves_logprobs(worker: LearnerWorker) -> None:
    # bandit: rows 0, 1 were rewarded, rows 2, 3 penalised; one step must move them apart
    batch = rl_batch(4, seed=2, row_advantages=[1.0, 1.0, -1.0, -1.0])
    before = row_mean_logprobs(worker, batch)
    worker.train_rl_step(batch)
    change = row_mean_logprobs(worker, batch) - before  # (4,)
    assert (change[:2] > 0).all(), change
    assert (change[2:] < 0).all(), change


def test_logprob_diff_measures_rollout_mismatch(worker: LearnerWorker) -> None:
    batch = rl_batch(4, seed=3, row_advantages=[0.5, -0.5, 0.5, -0.5])
    own = worker.logprobs(batch)  # (4, 16): exactly what train_rl_step computes as old_logprobs
    batch["rollout_logprobs"] = own * batch["loss_mask"]
    assert worker.train_rl_step(batch)["learner/logprob_diff"] == pytest.approx(0.0, abs=1e-7)
    # the sampler 0.1 nats lower on every loss token: mean |old - rollout| = 0.1
    own = worker.logprobs(batch)
    batch["rollout_logprobs"] = (own - 0.1) * batch["loss_mask"]
    assert worker.train_rl_step(batch)["learner/logprob_diff"] == pytest.approx(0.1, rel=1e-5)


def test_rollout_old_logprobs_skip_the_scoring_pass_and_are_used(tiny_model_dir: str) -> None:
    # 2 epochs x 2 minibatches; the "rollout" logprobs are the learner's own plus 0.05 nats.
    batch = rl_batch(8, seed=6, row_advantages=[1.0, -1.0, 0.5, 0.0, -0.5, 1.0, 0.0, -1.0])
    runs = {}
    for source in ("learner", "rollout"):
        w = new_worker(tiny_model_dir, ppo_epochs=2, old_logprobs=source)
        calls = []
        scoring = w.logprobs
        w.logprobs = lambda b, scoring=scoring, calls=calls: calls.append(1) or scoring(b)  # count passes
        batch["rollout_logprobs"] = scoring(batch) * batch["loss_mask"] + 0.05 * batch["loss_mask"]
        metrics = w.train_rl_step(dict(batch))
        runs[source] = (metrics, len(calls), {k: v.clone() for k, v in w.state_dict_for_rollout().items()})
        w.close()
    (learner_m, learner_calls, learner_w), (rollout_m, rollout_calls, rollout_w) = runs["learner"], runs["rollout"]
    assert (learner_calls, rollout_calls) == (1, 0)
    # the rollout logprobs are 0.05 above the learner's: the metric sees it either way
    assert learner_m["learner/logprob_diff"] == pytest.approx(0.05, rel=1e-4)
    assert rollout_m["learner/logprob_diff"] == pytest.approx(0.05, rel=1e-4)  # measured on minibatch 0
    # pi_old is the rollout's (0.05 higher), so the ratios, and with them the updates, differ
    assert rollout_m["learner/approx_kl"] != pytest.approx(learner_m["learner/approx_kl"], rel=1e-3)
    assert any(not torch.equal(learner_w[k], rollout_w[k]) for k in learner_w)


def test_rollout_old_logprobs_equal_to_the_learners_give_the_same_update(tiny_model_dir: str) -> None:
    batch = rl_batch(8, seed=7, row_advantages=[1.0, -1.0, 0.5, 0.0, -0.5, 1.0, 0.0, -1.0])
    weights = {}
    for source in ("learner", "rollout"):
        w = new_worker(tiny_model_dir, ppo_epochs=2, old_logprobs=source)
        batch["rollout_logprobs"] = w.logprobs(batch) * batch["loss_mask"]
        w.train_rl_step(dict(batch))
        weights[source] = w.state_dict_for_rollout()
        w.close()
    for name, tensor in weights["learner"].items():
        torch.testing.assert_close(weights["rollout"][name], tensor, rtol=0, atol=1e-6)


SKIP_BATCH = rl_batch(8, seed=8, row_advantages=[1.0, 0.0, -0.5, 2.0, 0.0, 0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def skip_runs(tiny_model_dir: str) -> dict[bool, tuple[dict[str, float], dict[str, torch.Tensor]]]:
    """One rank, 2 epochs x 2 minibatches of SKIP_BATCH, with and without leaving zero rows out
    (micro-batches of 2: minibatch 0's 3 rows left are one of 2 and one of 1, minibatch 1 one padding row)."""
    runs = {}
    for skip in (False, True):
        w = new_worker(tiny_model_dir, ppo_epochs=2, skip_zero_advantage=skip)
        metrics = w.train_rl_step(dict(SKIP_BATCH))
        runs[skip] = (metrics, {k: v.clone() for k, v in w.state_dict_for_rollout().items()})
        w.close()
    return runs


SAME_UPDATE_METRICS = ("learner/loss", "learner/pg_loss", "learner/grad_norm")
# Other micro-batches (or ranks) sum the gradients in another order, and AdamW turns that into update
# differences on near-zero gradient entries (measured: <= 2.8e-6 on one rank, 5.7e-6 over two ZeRO-2
# ranks); a wrongly dropped or doubled row moves weights by ~lr = 1e-2.
UPDATE_ATOL = 1e-4


def test_skipping_zero_advantage_rows_gives_the_same_update(
    skip_runs: dict[bool, tuple[dict[str, float], dict[str, torch.Tensor]]],
) -> None:
    (full, full_w), (skipped, skipped_w) = skip_runs[False], skip_runs[True]
    assert (full["learner/skipped_rows_frac"], skipped["learner/skipped_rows_frac"]) == (0.0, 5 / 8)
    # rows 0 and 2 have 15 loss tokens, row 3 has 12: the only rows trained
    assert skipped["learner/tokens"] == 42 and full["learner/tokens"] == 8 * 15 - 4 * 3
    for key in SAME_UPDATE_METRICS + ("learner/optimizer_steps", "learner/step"):
        assert skipped[key] == pytest.approx(full[key], rel=1e-5), key
    # the entropy is now a mean over the rows trained: near log(256) either way on a random init
    assert 5.0 < skipped["learner/entropy"] <= math.log(256) + 1e-5
    # minibatch 1 (all zero) still took its optimizer steps: the same AdamW moments moved both runs
    for name, tensor in full_w.items():
        torch.testing.assert_close(skipped_w[name], tensor, rtol=0, atol=UPDATE_ATOL)


def test_bad_rl_batches_are_clear_errors(worker: LearnerWorker) -> None:
    # 6 rows with batch_size 4: not a whole number of minibatches (6 is a multiple of micro 2)
    with pytest.raises(ValueError, match=r"6 rows.*multiple of LearnerConfig.batch_size \(4\)"):
        worker.train_rl_step(rl_batch(6, seed=4, row_advantages=[1.0] * 6))
    batch = rl_batch(4, seed=4, row_advantages=[1.0] * 4)
    del batch["advantages"]
    with pytest.raises(ValueError, match="advantages"):
        worker.train_rl_step(batch)


def test_kl_is_zero_before_any_update_then_grows(tiny_model_dir: str) -> None:
    w = new_worker(tiny_model_dir, kl_coef=0.1)
    try:
        assert w.reference is not None
        batch = rl_batch(4, seed=5, row_advantages=[1.0, -1.0, 1.0, -1.0])
        first = w.train_rl_step(batch)
        # policy = reference on the first minibatch: k3 = e^0 - 1 - 0 = 0 on every token
        assert first["learner/kl"] == pytest.approx(0.0, abs=1e-7)
        assert first["learner/loss"] == pytest.approx(first["learner/pg_loss"], abs=1e-7)
        # entropy comes from the same logits a plain HF forward of the starting weights gives
        with torch.no_grad():
            logits = w.reference.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        want = entropy_from_logits(logits, batch["loss_mask"]).item()
        assert first["learner/entropy"] == pytest.approx(want, rel=1e-5)
        second = w.train_rl_step(batch)
        assert second["learner/kl"] > 0
        # loss = pg_loss + kl_coef * kl (token-mean k3 is both the metric and the loss term)
        assert second["learner/loss"] == pytest.approx(
            second["learner/pg_loss"] + 0.1 * second["learner/kl"], rel=1e-5
        )
    finally:
        w.close()


def test_gspo_with_sequence_mean_is_picked_by_name(tiny_model_dir: str) -> None:
    w = new_worker(
        tiny_model_dir, policy_loss="gspo", aggregation="seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4
    )
    try:
        metrics = w.train_rl_step(rl_batch(4, seed=6, row_advantages=[1.0, -1.0, 0.5, 0.0]))
        # ratio 1: every sequence's token mean of -A is -A_i, then the mean over the 4 sequences
        # -(1 - 1 + 0.5 + 0) / 4 = -0.125, whatever the row lengths (15, 12, 15, 12 tokens)
        assert metrics["learner/pg_loss"] == pytest.approx(-0.125, rel=1e-6)
        assert metrics["learner/clip_frac"] == 0.0
    finally:
        w.close()


def test_rl_save_load_resumes_exactly_with_reference(tiny_model_dir: str, tmp_path: Path) -> None:
    # the reference is not in the checkpoint: it is model_dir's weights, rebuilt at construction
    w = new_worker(tiny_model_dir, kl_coef=0.1, ppo_epochs=2)
    try:
        batches = [rl_batch(4, seed=30 + i, row_advantages=[1.0, -0.5, 0.5, -1.0]) for i in range(3)]
        w.train_rl_step(batches[0])
        w.save(str(tmp_path))
        uninterrupted = [w.train_rl_step(b) for b in batches[1:]]
        w.load(str(tmp_path))
        assert w.step == 2  # 1 minibatch x 2 epochs
        resumed = [w.train_rl_step(b) for b in batches[1:]]
        for key in ("learner/loss", "learner/kl", "learner/grad_norm", "learner/step"):
            assert [m[key] for m in resumed] == pytest.approx([m[key] for m in uninterrupted], rel=1e-6), key
    finally:
        w.close()


def test_critic_learns_the_returns_and_resumes_exactly(tiny_model_dir: str, tmp_path: Path) -> None:
    """PPO's critic: `prepare` scores values (0 from the zero-initialised head), each minibatch also
    steps the critic towards the returns, and a checkpoint restores it (values and optimizer)."""
    w = new_worker(tiny_model_dir, ppo_epochs=2, kl_reward_coef=0.1, critic=CriticConfig(enabled=True, lr=1e-3))
    try:
        batches = [rl_batch(4, seed=40 + i, row_advantages=[1.0, -0.5, 0.5, -1.0]) for i in range(3)]
        for b in batches:
            b["returns"] = 0.5 * b["loss_mask"]  # the value every response token should learn
        scored = w.prepare(batches[0])
        assert set(scored) == {"old_logprobs", "ref_logprobs", "values"}  # kl_reward_coef builds the reference
        assert scored["values"].abs().max() == 0  # zero head
        torch.testing.assert_close(scored["old_logprobs"], scored["ref_logprobs"])  # nothing trained yet
        with pytest.raises(ValueError, match="'returns'"):
            w.train_rl_step(batches[0])
        first = w.train_rl_step(batches[0] | scored)
        assert first["critic/returns"] == pytest.approx(0.5)
        assert first["critic/value_loss"] > 0 and math.isfinite(first["critic/grad_norm"])
        w.save(str(tmp_path))
        later = [w.train_rl_step(b | w.prepare(b)) for b in batches[1:]]
        mask = batches[0]["loss_mask"] != 0
        moved = w.prepare(batches[0])["values"][mask]
        assert float((moved - 0.5).abs().mean()) < 0.3  # from 0 towards the returns (0.5 away at the start)
        w.load(str(tmp_path))
        resumed = [w.train_rl_step(b | w.prepare(b)) for b in batches[1:]]
        for key in ("learner/loss", "critic/value_loss", "critic/grad_norm", "learner/step"):
            assert [m[key] for m in resumed] == pytest.approx([m[key] for m in later], rel=1e-6), key
    finally:
        w.close()


# ---- K epochs of minibatches; 2 ranks reproduce 1 ---------------------------------------------------

MULTI: dict[str, Any] = {"kl_coef": 0.05, "ppo_epochs": 2, "tis_cap": 2.0}
MULTI_BATCHES = [rl_batch(8, seed=20 + i, row_advantages=[1, -1, 0.5, -0.5, 2, 0, -1, 1]) for i in range(2)]
for _b in MULTI_BATCHES:
    # a sampler near the uniform distribution (log 1/256 ~ -5.545) on the loss tokens
    _b["rollout_logprobs"] = -5.5 * _b["loss_mask"]


@pytest.fixture(scope="module")
def one_rank_runs(tiny_model_dir: str) -> list[dict[str, float]]:
    w = new_worker(tiny_model_dir, **MULTI)
    try:
        return [w.train_rl_step(b) for b in MULTI_BATCHES]
    finally:
        w.close()


def test_two_epochs_of_two_minibatches_is_four_steps(one_rank_runs: list[dict[str, float]]) -> None:
    first, second = one_rank_runs
    # 8 rows / batch_size 4 = 2 minibatches, x 2 epochs
    assert first["learner/optimizer_steps"] == 4
    assert first["learner/step"] == 4
    assert second["learner/step"] == 8
    # later minibatches see updated weights: the policy moved away from old
    assert first["learner/approx_kl"] > 0
    assert 0 < first["learner/tis_weight_mean"] <= 2.0


RL_METRICS = (
    "learner/loss",
    "learner/pg_loss",
    "learner/clip_frac",
    "learner/approx_kl",
    "learner/kl",
    "learner/entropy",
    "learner/grad_norm",
    "learner/logprob_diff",
    "learner/tis_weight_mean",
    "learner/ratio_mean",
)


@pytest.mark.ray
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_actors_reproduce_one_rank(
    ray_local: Any, tiny_model_dir: str, one_rank_runs: list[dict[str, float]], zero_stage: int
) -> None:
    # Global per-minibatch normalisers make 2 ranks x 1 micro-batch sum to 1 rank x 2 micro-batches;
    # only float summation order differs (measured: ZeRO 0 <= 4e-8, ZeRO 3 <= 6e-7 relative).
    cfg = LearnerConfig(**(BASE | MULTI), zero_stage=zero_stage)
    group = LearnerGroup(cfg, tiny_model_dir, world_size=2, total_steps=50)
    try:
        runs = [group.train_rl_step(b) for b in MULTI_BATCHES]
    finally:
        group.shutdown()
    for got, want in zip(runs, one_rank_runs):
        for key in RL_METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
        for key in ("learner/optimizer_steps", "learner/step", "learner/tokens", "learner/lr"):
            assert got[key] == want[key], key


@pytest.mark.ray
def test_two_zero2_actors_leaving_uneven_rows_out_reproduce_one_rank(
    ray_local: Any, tiny_model_dir: str, skip_runs: dict[bool, tuple[dict[str, float], dict[str, torch.Tensor]]]
) -> None:
    # Micro-batches of 1 row. Minibatch 0 keeps 3 rows (2 on rank 0, 1 + a padding row on rank 1),
    # minibatch 1 none (one padding row each): equal micro-batch counts per minibatch (2, then 1) keep
    # ZeRO-2's per-micro-batch reductions in step.
    full, full_w = skip_runs[False]
    cfg = LearnerConfig(**(BASE | {"ppo_epochs": 2, "micro_batch_size": 1}), zero_stage=2)
    group = LearnerGroup(cfg, tiny_model_dir, world_size=2, total_steps=50)
    try:
        got = group.train_rl_step(dict(SKIP_BATCH))
        weights = group.state_dict_for_rollout()
    finally:
        group.shutdown()
    assert got["learner/skipped_rows_frac"] == 5 / 8
    for key in SAME_UPDATE_METRICS:
        assert got[key] == pytest.approx(full[key], rel=1e-5), key
    for name, tensor in full_w.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=UPDATE_ATOL)
