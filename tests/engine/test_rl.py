"""The RL stage: batch building and step metrics by hand, then the real loop end to end."""

from __future__ import annotations

import math

import pytest
import torch

from engine.collector_base import rollout_metrics
from engine.rl import rl_batch
from rollout.types import Response
from tests.engine.plugins import PATH as PLUGINS
from tests.engine.plugins import write_doubling_prompts


def _response(prompt: list[int], response: list[int], logprobs: list[float], finish: str = "stop") -> Response:
    return Response(task_id="t", prompt_ids=prompt, response_ids=response, rollout_logprobs=logprobs,
                    text="", finish_reason=finish, weight_version=0)


def test_rl_batch_positions_and_padding() -> None:
    responses = [_response([5, 6], [7, 8, 9], [-0.1, -0.2, -0.3]), _response([5], [4], [-0.5], "length")]
    batch = rl_batch(responses, torch.tensor([1.0, 0.0]), pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # token t is a response token -> loss_mask[t] = 1 (predicted from tokens < t)
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert torch.allclose(batch["rollout_logprobs"], torch.tensor([[0, 0, -0.1, -0.2, -0.3], [0, -0.5, 0, 0, 0]]))


def test_rl_batch_drops_unjudged_samples() -> None:
    responses = [_response([5], [7, 8], [-0.1, -0.2]), _response([5], [4], [-0.5])]
    batch = rl_batch(responses, torch.tensor([float("nan"), 1.0]), pad_id=0)
    assert batch["loss_mask"][0].sum() == 0  # score None: no token of it is trained on


def test_rollout_metrics_by_hand() -> None:
    responses = [_response([1], [2, 3], [0.0, 0.0]), _response([1], [2], [0.0], "length"),
                 _response([1], [2, 3, 4], [0.0] * 3), _response([1], [2, 3, 4, 5], [0.0] * 4)]
    rewards = torch.tensor([[1.0, 1.0], [0.0, float("nan")]])  # (P=2, G=2)
    m = rollout_metrics(responses, rewards)
    # judged rewards 1, 1, 0: mean 2/3, unbiased std sqrt(1/3) ≈ 0.577
    assert m["rollout/reward_mean"] == pytest.approx(2 / 3)
    assert m["rollout/reward_std"] == pytest.approx(math.sqrt(1 / 3))
    assert m["rollout/response_len"] == pytest.approx((2 + 1 + 3 + 4) / 4)
    assert m["rollout/truncated_frac"] == pytest.approx(0.25)
    assert m["verifier/dropped_frac"] == pytest.approx(0.25)
    assert m["task/all_solved_frac"] == pytest.approx(0.5)  # prompt 0 solved by both samples
    assert m["task/none_solved_frac"] == pytest.approx(0.5)  # prompt 1: a 0 and an unjudged


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_two_rl_steps_end_to_end(ray_local, tmp_path) -> None:
    """Real vLLM rollout actor, verifier pool actor, 2 DeepSpeed learners under ZeRO-2, shm weight sync."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics
    from learner.algos.sft import token_logprobs

    # A random model never solves arithmetic (reward 0 everywhere: no gradient); even-length rewards move it.
    data = write_doubling_prompts(tmp_path / "prompts.jsonl")
    cfg = compose_config(["experiment=arith_tiny", "stage=rl", "steps=2", "progress=false", f"runs_dir={tmp_path}",
                          "task=file", f"task.file.path={data}", f"task.file.verifier={PLUGINS}:EvenLengthVerifier",
                          "corpus_docs=40", "cluster.learners=2", "learner.zero_stage=2", "rollout.backend=vllm",
                          "rollout.num_workers=1", "rollout.weight_sync=shm", "rl.prompts_per_step=8", "rollout.n=4",
                          "rollout.temperature=1.5", "learner.batch_size=16", "learner.micro_batch_size=8",
                          "learner.lr=1e-3", "task.eval_size=8", "rollout.kv_cache_gib=0.5"])
    result = run_stage(cfg)
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # step 0: the evaluation before any update
    assert {"eval/accuracy", "eval/pass@1", "eval/pass@G"} <= set(records[0])
    for r in records[1:]:
        # 8 prompts × 4 samples = 32 responses in 2 minibatches of 16: two optimizer steps per RL step
        assert r["learner/optimizer_steps"] == 2
        # The rollout served exactly the learner's weights (model_dir at step 1, the synced step-1
        # weights at step 2): its sampled-token logprobs equal the learner's recomputation.
        assert r["learner/logprob_diff"] < 1e-3
        assert 0.0 < r["rollout/reward_mean"] < 1.0 and r["learner/grad_norm"] > 0  # mixed rewards: updates
    assert records[-1]["rollout/weight_version"] == 2
    assert {"eval/pass@1", "eval/pass@G", "perf/rollout_s", "perf/verify_s", "perf/learn_s", "perf/sync_s"} <= set(
        records[-1])
    assert (result.export_dir / "config.json").exists()
    # The rollout actor ended up serving version 2, which it loaded only after checking it against the
    # checksum of the learner's state, i.e. the final export; that export is not the starting model.
    start_dir = result.run_dir.parent / "model"
    ids = torch.tensor([AutoTokenizer.from_pretrained(start_dir)("What is 12+34?\nAnswer: 46")["input_ids"]])
    with torch.no_grad():
        start, final = (token_logprobs(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits, ids)
                        for d in (start_dir, result.export_dir))
    assert float((final - start).abs().max()) > 1e-3  # far beyond the 1e-4 of rollout/learner parity


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_rl_resume_reproduces_steps(ray_local, tmp_path) -> None:
    """Resume from the step-2 checkpoint: steps 3-4 sample, score and train exactly as before."""
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    data = write_doubling_prompts(tmp_path / "prompts.jsonl")
    args = ["experiment=arith_tiny", "stage=rl", "steps=4", "save_every=2", "progress=false", f"runs_dir={tmp_path}",
            "task=file", f"task.file.path={data}", f"task.file.verifier={PLUGINS}:EvenLengthVerifier",
            "task.eval_size=4", "rl.prompts_per_step=4", "rollout.n=4", "learner.batch_size=16",
            "learner.micro_batch_size=16", "rollout.kv_cache_gib=0.5", "rollout.temperature=1.5",
            "learner.lr=1e-2", "corpus_docs=40"]
    first = run_stage(compose_config(args))
    before = {r["step"]: r for r in read_metrics(first.run_dir / "metrics.jsonl")}
    assert (first.run_dir / "checkpoints" / "step_000002" / "state.json").exists()
    # The test means something only if the policy really changed between the steps it compares.
    for step in (1, 2):
        assert 0.0 < before[step]["rollout/reward_mean"] < 1.0 and before[step]["learner/grad_norm"] > 0

    run_stage(compose_config([*args, "resume=true"]))
    after = {r["step"]: r for r in read_metrics(first.run_dir / "metrics.jsonl")}
    assert sorted(after) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        assert after[step]["rollout/response_len"] == before[step]["rollout/response_len"]
        assert after[step]["rollout/reward_mean"] == before[step]["rollout/reward_mean"]
        assert after[step]["learner/loss"] == pytest.approx(before[step]["learner/loss"], rel=1e-4, abs=1e-7)
        assert after[step]["rollout/weight_version"] == step
