"""Verifier failures in RL: infra errors are counted per step, never trained as scores, warned about
on the console, and stop the run when too many; what a verifier prints goes to the run's verifier.log.

The step-level rule by hand first, then one real 2-step run (tiny model, hf rollout, local Ray) whose
verifier (`tests.engine.plugins.MisbehavingVerifier`) fails in a different way on each task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.scoring import VerifierInfraError, step_verifier_metrics
from tests.engine.plugins import MISBEHAVIOURS
from tests.engine.plugins import PATH as PLUGINS
from verifiers.base import Task, Verdict, infra_error


def _judged(verdicts: list[Verdict], verifier: str = "pkg.mod:Checker") -> list[tuple[Task, Verdict]]:
    return [(Task(str(i), "", "", verifier), v) for i, v in enumerate(verdicts)]


def test_step_counters_by_kind_and_one_warning(capsys: pytest.CaptureFixture[str]) -> None:
    verdicts = [Verdict(1.0), Verdict(0.0), infra_error("timeout", "timeout: verify ran past timeout_s=1"),
                infra_error("crash", "crash: the worker died (exit code 13)"),
                infra_error("error", "error: verify raised ValueError: x"), infra_error("error", "error: verify raised "
                                                                                       "ValueError: x\n[output]"),
                infra_error("bad_reference", "task 7: the reference '\\frac{1}{' cannot be parsed")]
    m = step_verifier_metrics(_judged(verdicts), step=3, max_infra_error_frac=0.8)
    # 5 of 7 failed; a timeout and a crash each cost a worker restart
    assert {k: v for k, v in m.items() if k.startswith("verifier/Checker/")} == {
        "verifier/Checker/infra_errors": 5.0, "verifier/Checker/timeouts": 1.0, "verifier/Checker/crashes": 1.0,
        "verifier/Checker/restarts": 2.0, "verifier/Checker/bad_references": 1.0}
    assert m["verifier/infra_error_frac"] == pytest.approx(5 / 7)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[assay] warning: step 3: 5 of 7 verifications were infra errors")
    assert "verifier 'Checker': 5, most often error (2x): error: verify raised ValueError: x;" in line


def test_a_clean_step_has_zero_counters_and_no_warning(capsys: pytest.CaptureFixture[str]) -> None:
    m = step_verifier_metrics(_judged([Verdict(1.0), Verdict(0.5)], "math"), step=1, max_infra_error_frac=0.5)
    assert m == {"verifier/math/infra_errors": 0.0, "verifier/math/timeouts": 0.0, "verifier/math/crashes": 0.0,
                 "verifier/math/restarts": 0.0, "verifier/math/bad_references": 0.0, "verifier/infra_error_frac": 0.0}
    assert capsys.readouterr().out == ""


def test_infra_errors_above_the_limit_stop_the_run() -> None:
    verdicts = [Verdict(1.0), *[infra_error("invalid_score", "invalid_score: nan is not a number")] * 2]
    assert step_verifier_metrics(_judged(verdicts), 1, max_infra_error_frac=0.7)  # 2/3 <= 0.7: goes on
    with pytest.raises(VerifierInfraError, match=r"step 1: 2 of 3 .*verifier 'Checker': 2, most often invalid_score "
                                                 r"\(2x\): invalid_score: nan is not a number; that is above "
                                                 r"verifier.max_infra_error_frac=0.5"):
        step_verifier_metrics(_judged(verdicts), 1, max_infra_error_frac=0.5)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """12 training tasks, one per misbehaviour and six that judge normally (the reference names the
    behaviour), 2 held-out `ok` tasks, and a tiny model built on their text."""
    from engine.models import ModelConfig, prepare_model_dir

    root = tmp_path_factory.mktemp("verifier_failures")
    kinds = [k for k in MISBEHAVIOURS if k != "ok"] + ["ok"] * 6
    rows = [{"prompt": f"What is {i}+{i}?\n", "answer": kind, "response": f"Answer: {2 * i}"}
            for i, kind in enumerate([*kinds, "ok", "ok"])]
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[-2:]))
    model = prepare_model_dir(ModelConfig(initializer_range=0.3), [r["prompt"] + r["response"] for r in rows],
                              root / "tiny")
    return train, held, str(model)


@pytest.mark.slow
@pytest.mark.ray
def test_rl_run_counts_verifier_failures_and_stops_when_they_dominate(
    ray_local, task_files, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    train, held, model = task_files
    cfg = compose_config([
        "stage=rl", "steps=2", "progress=false", f"runs_dir={tmp_path}", f"model.path={model}", "task=file",
        f"task.file.path={train}", f"task.file.eval_path={held}", f"task.file.verifier={PLUGINS}:MisbehavingVerifier",
        "task.eval_size=2", "rl.prompts_per_step=12", "rollout.n=2", "rollout.max_tokens=8", "rollout.backend=hf",
        "rollout.temperature=1.0", f"rollout.shm_dir={tmp_path}", "learner.batch_size=24",
        "learner.micro_batch_size=24", "learner.lr=1e-2", "cluster.learners=1", "cluster.num_cpus=4",
        "verifier.workers=2", "verifier.timeout_s=2", "verifier.max_infra_error_frac=0.75",
    ])
    # Step 1 draws all 12 tasks (one epoch): 5 of them fail the verifier, at most 10 of at most 17
    # distinct verifications (0.59 <= 0.75). Step 2 is the second epoch, where every call raises.
    with pytest.raises(VerifierInfraError, match=r"step 2: (\d+) of \1 verifications were infra errors.*"
                                                 r"verifier 'MisbehavingVerifier': \d+, most often error .*"
                                                 r"RuntimeError: broken on the second epoch; that is above "
                                                 r"verifier.max_infra_error_frac=0.75"):
        run_stage(cfg)
    run_dir = tmp_path / "default" / "rl"
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(records) == [0, 1]  # the baseline evaluation, then step 1; step 2 never trained
    step = records[1]
    m = {k.rpartition("/")[2]: v for k, v in step.items() if k.startswith("verifier/MisbehavingVerifier/")}
    # raise, hang, crash, nan, five: 1-2 distinct responses each (n=2, identical ones are verified once)
    assert 1 <= m["timeouts"] <= 2 and 1 <= m["crashes"] <= 2 and m["restarts"] == m["timeouts"] + m["crashes"]
    assert 5 <= m["infra_errors"] <= 10
    assert 0 < step["verifier/infra_error_frac"] <= 10 / 17 and step["verifier/dropped_frac"] > 0
    # Only judged samples train: NaN and 5.0 never became rewards, every judged reward is 0 or 1.
    assert 0.0 <= step["rollout/reward_mean"] <= 1.0 and step["learner/grad_norm"] > 0
    assert records[0]["eval/infra_error_frac"] == 0.0  # the held-out tasks judge normally
    out = capfd.readouterr().out
    assert "[assay] warning: step 1: " in out and "verifier 'MisbehavingVerifier'" in out
    # 100 kB printed per `print` item: in the run's verifier.log (bounded), never on the console.
    assert "PRINTED-BY-THE-VERIFIER" not in out
    log = (run_dir / "verifier.log").read_text()
    assert "PRINTED-BY-THE-VERIFIER" in log and len(log) < 20 * 5000
    session_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    assert not [f for f in session_logs.glob("*.out") if b"PRINTED-BY-THE-VERIFIER" in f.read_bytes()]
