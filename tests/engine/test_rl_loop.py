"""The RL loop's integration tests: served-weight parity after a sync, a run killed mid-way that resumes
exactly, and a verifier timeout that is left out (an infra error, never a 0) without stopping the step.

The verifiers they score with live in `tests.engine.plugins` (the pool's process workers import them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.plugins import PATH as PLUGINS
from tests.engine.plugins import write_doubling_prompts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_doubling_prompts(tmp_path_factory.mktemp("rl_loop_data") / "prompts.jsonl")


@pytest.fixture(scope="module")
def tiny_model(prompts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama built with initializer_range 0.3 (at 0.02 a random model repeats one token, so
    every sample would have the same length)."""
    from engine.models import ModelConfig, prepare_model_dir

    corpus = [row["prompt"] + row["response"] for row in map(json.loads, prompts_file.read_text().splitlines())]
    out = tmp_path_factory.mktemp("rl_loop_model") / "tiny"
    return str(prepare_model_dir(ModelConfig(initializer_range=0.3), corpus, out))


def _file_run_args(prompts_file: Path, tiny_model: str, runs_dir: Path, verifier: str) -> list[str]:
    """A small RL run on the prompts file; explicit so it does not depend on an experiment's defaults."""
    return ["stage=rl", "progress=false", f"runs_dir={runs_dir}", f"model.path={tiny_model}", "task=file",
            f"task.file.path={prompts_file}", f"task.file.verifier={PLUGINS}:{verifier}", "task.eval_size=4",
            "rl.prompts_per_step=4", "rollout.n=4", "rollout.max_tokens=8", "rollout.temperature=1.0",
            "rollout.kv_cache_gib=0.5", f"rollout.shm_dir={runs_dir}", "learner.batch_size=16",
            "learner.micro_batch_size=16", "learner.lr=1e-2", "learner.lr_schedule=constant",
            "learner.warmup_steps=0", "cluster.learners=1", "cluster.num_cpus=4"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_verifier_timeout_is_left_out_and_the_step_goes_on(ray_local, prompts_file, tiny_model, tmp_path) -> None:
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    args = _file_run_args(prompts_file, tiny_model, tmp_path, "SlowOddVerifier")
    result = run_stage(compose_config([*args, "steps=1", "verifier.timeout_s=0.5", "verifier.workers=4",
                                       "verifier.max_infra_error_frac=1.0"]))
    step = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}[1]
    # Every verdict that came back is 1.0 and a timed-out sample is an infra error: left out of the mean
    # (NaN, counted in verifier/dropped_frac and the timeouts), never trained as a 0.
    assert step["verifier/SlowOddVerifier/timeouts"] > 0 and step["verifier/dropped_frac"] > 0
    assert step["verifier/SlowOddVerifier/infra_errors"] == step["verifier/SlowOddVerifier/timeouts"]
    assert step["rollout/reward_mean"] == 1.0
    assert step["rollout/weight_version"] == 1
    assert (result.export_dir / "config.json").exists()


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _start_run(args: list[str], log: Path) -> subprocess.Popen:
    """A real `assay train` process in its own session (process group) with its own local Ray instance
    (init_ray never attaches)."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "engine.cli", "train", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + 240
    while not path.exists():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after 240 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _leftovers(pids: list[int], shm_dir: Path) -> list[Path]:
    """The shared-memory weight slots (learner rank 0's) and doorbell socket dirs (the driver's) that
    processes `pids` own."""
    import tempfile

    return [path for pid in pids
            for path in (*shm_dir.glob(f"assay-weights-{pid}-*"), *Path(tempfile.gettempdir()).glob(f"assay-bell-{pid}-*"))]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_rl_runs_killed_or_stopped_resume_exactly_and_leave_nothing(ray_local, prompts_file, tiny_model,
                                                                    tmp_path) -> None:
    """Two real `assay train` processes: one SIGKILLed once step 2's checkpoint exists (its shared memory and
    socket dir stay behind until the next start removes them), one sent SIGTERM mid-run (it checkpoints
    the step it is on, stops every process and exits 143). Both resume to the metrics of a run that was
    never interrupted."""
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    def args(runs_dir: Path, *extra: str) -> list[str]:
        return [*_file_run_args(prompts_file, tiny_model, runs_dir, "EvenLengthVerifier"), "steps=3", *extra]

    killed_dir, stopped_dir, fresh_dir = tmp_path / "killed", tmp_path / "stopped", tmp_path / "fresh"
    run_dir = killed_dir / "default" / "rl"
    log = tmp_path / "killed.log"
    proc = _start_run(args(killed_dir, "save_every=1"), log)
    children: list[int] = []
    try:
        _wait_for(run_dir / "checkpoints" / "step_000002" / "state.json", proc, log, "a step-2 checkpoint")
        children = _descendants(proc.pid)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (run_dir / "final").exists()
        # Ray's own processes (GCS, raylet, workers) share the run's fate: none may outlive it.
        stray_by = time.monotonic() + 30
        while _alive(children) and time.monotonic() < stray_by:
            time.sleep(0.5)
        assert not _alive(children), f"processes outlived the killed run: {_alive(children)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for pid in _alive(children):  # only processes this test started
            os.kill(pid, signal.SIGKILL)
    killed_pids = [proc.pid, *children]
    assert len(_leftovers(killed_pids, killed_dir)) == 2  # a weight slot dir and a doorbell dir

    killed = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert {1, 2} <= set(killed) and 3 not in killed
    # The comparison means something only if the policy really moved before the step it compares.
    for step in (1, 2):
        assert 0.0 < killed[step]["rollout/reward_mean"] < 1.0 and killed[step]["learner/grad_norm"] > 0

    stop_log = tmp_path / "stopped.log"
    stopped = _start_run(args(stopped_dir, "steps=4"), stop_log)  # no periodic checkpoints: only the stop's
    try:
        _wait_for(stopped_dir / "default" / "rl" / "metrics.jsonl", stopped, stop_log, "metrics")
        while '"step": 1' not in (stopped_dir / "default" / "rl" / "metrics.jsonl").read_text():
            assert stopped.poll() is None, stop_log.read_text()[-3000:]
            time.sleep(0.1)
        stopped_children = _descendants(stopped.pid)
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(timeout=120) == 143, stop_log.read_text()[-3000:]
    finally:
        if stopped.poll() is None:
            os.killpg(stopped.pid, signal.SIGKILL)
    out = stop_log.read_text()
    line = next(line for line in out.splitlines() if "stopped at step" in line)
    at = int(line.split("stopped at step ")[1].split()[0])
    assert at in (1, 2, 3) and f"step_{at:06d}" in line and line.endswith("resume=true"), line
    assert "Traceback" not in out
    time.sleep(2)
    assert not _alive(stopped_children), f"processes outlived the stopped run: {_alive(stopped_children)}"
    assert _leftovers([stopped.pid, *stopped_children], stopped_dir) == []  # a clean stop removes its own

    resumed = run_stage(compose_config([*args(killed_dir, "save_every=1"), "resume=true"]))
    assert _leftovers(killed_pids, killed_dir) == []  # the next start removed what the killed run left
    resumed_stop = run_stage(compose_config([*args(stopped_dir, "steps=4"), "resume=true"]))
    fresh = run_stage(compose_config(args(fresh_dir, "steps=4")))
    before = {r["step"]: r for r in read_metrics(fresh.run_dir / "metrics.jsonl")}
    for result, upto in ((resumed, 3), (resumed_stop, 4)):
        after = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}
        assert sorted(after) == list(range(upto + 1))
        for step in range(1, upto + 1):
            for key in ("rollout/response_len", "rollout/reward_mean", "rollout/truncated_frac",
                        "rollout/weight_version"):
                assert after[step][key] == before[step][key], (step, key)
            for key in ("learner/loss", "learner/grad_norm", "learner/logprob_diff"):
                assert after[step][key] == pytest.approx(before[step][key], rel=1e-4, abs=1e-7), (step, key)


@pytest.fixture(scope="module")
def trained_learner(ray_local, tiny_model):
    """A one-rank learner after one high-lr optimizer step, and whether that step changed every weight."""
    import torch
    from transformers import AutoTokenizer

    from learner.config import LearnerConfig
    from learner.group import LearnerGroup

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [f"What is {i}+{i}?\nAnswer: {2 * i}" for i in (3, 7, 11, 19)]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (4, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (4, T)
    loss_mask = attention_mask.clone()
    loss_mask[:, 0] = 0
    cfg = LearnerConfig(lr=1e-2, lr_schedule="constant", batch_size=4, micro_batch_size=4)
    learner = LearnerGroup(cfg, tiny_model, world_size=1, total_steps=1)
    try:
        before = learner.state_dict_for_rollout()
        learner.train_step({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})
        state = learner.state_dict_for_rollout()
        changed = max(float((state[k] - before[k]).abs().max()) for k in state)
        yield learner, state, changed
    finally:
        learner.shutdown()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(("backend", "transport"), [
    pytest.param("vllm", "shm", marks=pytest.mark.vllm), pytest.param("vllm", "ray", marks=pytest.mark.vllm),
    pytest.param("vllm", "nccl", marks=pytest.mark.vllm), ("hf", "shm"), ("hf", "ray")])
def test_synced_rollout_logprobs_match_the_learner(trained_learner, tiny_model, tmp_path, backend, transport) -> None:
    """After learner rank 0 publishes its updated weights (through each transport of the table, `nccl`
    over gloo here), the rollout's sampled-token logprobs are the learner's own recomputation, within
    1e-4 in fp32."""
    import torch

    from engine.rl import rl_batch
    from rollout.config import RolloutConfig
    from rollout.group import RolloutGroup
    from rollout.types import Sampling
    from verifiers.base import Task

    learner, state, changed = trained_learner
    assert changed > 1e-3  # lr 1e-2 Adam: every step moves weights by ~lr
    cfg = RolloutConfig(backend=backend, weight_sync=transport, dtype="float32", kv_cache_gib=0.5,
                        shm_dir=str(tmp_path))
    rollout = RolloutGroup(cfg, tiny_model)
    try:
        learner.attach_weights(cfg.weight_spec())
        if rollout.transport.rendezvous:
            import ray

            from weights.nccl import free_port

            port = free_port()
            ray.get([learner.join_weight_group("127.0.0.1", port, 2), *rollout.join_weight_group("127.0.0.1", port)])
        metrics = rollout.update_weights(learner.publish_weights, version=1)
        assert metrics["perf/weight_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
        tasks = [Task(id=f"t{i}", prompt=f"What is {i}+{i}?\n", reference="", verifier="math") for i in range(3)]
        responses = rollout.generate(tasks, 2, Sampling(temperature=1.0, max_tokens=12, seed=0))
        assert rollout.versions() == [1] and {r.weight_version for r in responses} == {1}
    finally:
        rollout.shutdown()
    batch = rl_batch(responses, torch.zeros(len(responses)), pad_id=0)
    mask = batch["loss_mask"].bool()  # (B, T): the sampled tokens
    assert mask.sum() >= 6
    learner_logprobs = learner.logprobs(batch)  # (B, T)
    diff = (learner_logprobs[mask] - batch["rollout_logprobs"][mask]).abs().max()
    assert float(diff) < 1e-4
    # The check can tell the versions apart: the starting weights give these tokens other logprobs.
    from transformers import AutoModelForCausalLM

    from learner.algos.sft import token_logprobs

    with torch.no_grad():
        start = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    start_logprobs = token_logprobs(start, batch["input_ids"])  # (B, T)
    assert float((start_logprobs[mask] - batch["rollout_logprobs"][mask]).abs().max()) > 1e-2


@pytest.fixture(scope="module")
def half_unsolvable_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompts whose references alternate odd/even: `OddReferenceUnsolvable` gives the odd half groups of
    all-equal rewards."""
    path = tmp_path_factory.mktemp("dapo_data") / "prompts.jsonl"
    rows = ({"prompt": f"What is {i}+0?\n", "answer": str(i), "response": str(i)} for i in range(40))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_dapo_dynamic_sampling_back_fills_with_two_learners(ray_local, half_unsolvable_file, tiny_model,
                                                            tmp_path) -> None:
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    args = [*_file_run_args(half_unsolvable_file, tiny_model, tmp_path, "OddReferenceUnsolvable"), "algo=dapo",
            "steps=2", "rl.max_sample_rounds=6", "cluster.learners=2", "learner.micro_batch_size=8"]
    result = run_stage(compose_config(args))
    records = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}
    for step in (1, 2):
        r = records[step]
        assert r["rollout/kept_groups"] == 4  # back-filled to rl.prompts_per_step
        assert r["learner/grad_norm"] > 0 and r["learner/clip_frac_high"] >= 0.0
    # ~half the groups are all-zero: filling 4 mixed groups takes more than one round of 4 prompts
    assert max(records[s]["rollout/sample_rounds"] for s in (1, 2)) >= 2
    assert records[2]["rollout/weight_version"] == 2


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_dapo_that_cannot_fill_its_batch_says_so_and_skips_the_update(ray_local, prompts_file, tiny_model,
                                                                      tmp_path, capsys) -> None:
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    args = [*_file_run_args(prompts_file, tiny_model, tmp_path, "AlwaysRight"), "algo=dapo", "steps=1",
            "rl.max_sample_rounds=2", "rl.overlong_buffer=0"]  # without shaping every group is all 1.0
    result = run_stage(compose_config(args))
    assert "found 0 of the 4 groups with mixed rewards in 2 rounds" in capsys.readouterr().out
    step = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}[1]
    assert step["rollout/kept_groups"] == 0 and step["rollout/sample_rounds"] == 2
    assert step["rollout/informative_frac"] == 0.0 and "learner/loss" not in step
    assert step["rollout/weight_version"] == 1 and (result.export_dir / "config.json").exists()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.parametrize("algo", ["dr_grpo", "rloo", "reinforce_pp", "ppo"])
def test_two_steps_of_each_algo_with_two_learners(ray_local, prompts_file, tiny_model, tmp_path, algo) -> None:
    """`algo=grpo` runs in tests/engine/test_rl.py and `algo=dapo` above, both with 2 learners."""
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    args = [*_file_run_args(prompts_file, tiny_model, tmp_path, "EvenLengthVerifier"), f"algo={algo}", "steps=2",
            "cluster.learners=2", "learner.micro_batch_size=8"]
    if algo in ("rloo", "reinforce_pp"):  # pi_old from the rollout: no scoring pass (rloo), ref only (reinforce_pp)
        args.append("learner.old_logprobs=rollout")
    result = run_stage(compose_config(args))
    records = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}
    for step in (1, 2):
        assert 0.0 < records[step]["rollout/reward_mean"] < 1.0 and records[step]["learner/grad_norm"] > 0
        assert records[step]["learner/logprob_diff"] < 1e-4
    assert records[2]["rollout/weight_version"] == 2
    if algo in ("ppo", "reinforce_pp"):  # KL in the reward: the reference is scored, 0 before any update
        assert records[1]["rl/kl_to_ref"] == pytest.approx(0.0, abs=1e-6) and records[2]["rl/kl_to_ref"] != 0.0
    if algo == "ppo":  # the critic trained on both ranks' shares: its loss and grad norm are real numbers
        assert records[2]["critic/value_loss"] > 0 and records[2]["critic/grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_async_rollout_runs_ahead_but_never_past_max_staleness(ray_local, prompts_file, tiny_model, tmp_path) -> None:
    """`rl.max_staleness=1`: the rollout of step j + 1 overlaps the update of step j, so its samples come
    from weights one version old (importance-corrected by tis_cap); none is ever older than that."""
    from engine.cli import run_stage
    from engine.config import ConfigError, compose_config
    from engine.metrics import read_metrics

    args = [*_file_run_args(prompts_file, tiny_model, tmp_path, "EvenLengthVerifier"), "steps=4"]
    with pytest.raises(ConfigError, match="learner.tis_cap"):
        compose_config([*args, "rl.max_staleness=1"])
    with pytest.raises(ConfigError, match="learner.old_logprobs=rollout .* only for on-policy samples"):
        compose_config([*args, "rl.max_staleness=1", "learner.tis_cap=2.0", "learner.old_logprobs=rollout"])
    result = run_stage(compose_config([*args, "rl.max_staleness=1", "learner.tis_cap=2.0"]))
    records = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}
    staleness = [records[step]["rollout/staleness_max"] for step in (1, 2, 3, 4)]
    assert staleness[0] == 0  # step 1 is sampled from the starting weights, which it trains
    assert max(staleness) == 1 and all(s <= 1 for s in staleness), staleness
    assert all(records[step]["rollout/stale_dropped"] == 0 for step in (1, 2, 3, 4))
    assert all(records[step]["learner/grad_norm"] > 0 for step in (1, 2, 3, 4))
    assert records[4]["rollout/weight_version"] == 4
    # the learner saw the lag: old weights' logprobs differ from the current ones by far more than 1e-4
    assert max(records[step]["learner/logprob_diff"] for step in (2, 3, 4)) > 1e-3
