"""`linear_code` tasks: hidden tests judged by the real sandboxed verifier, the flawed teacher, determinism,
resume, held-out disjointness, and a 2-step RL run of the real loop scored by `unit_tests`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.tasks import TaskConfig, TaskSource, load_task_source
from engine.tasks.base import LinearCodeConfig
from engine.tasks.linear_code import LinearCodeSource, program
from verifiers.base import Task

_ASSERT = re.compile(r"^    assert candidate\((-?\d+)\) == (-?\d+)$")


def _line_from_prompt(prompt: str) -> tuple[int, int]:
    """(a, b) read off the shown examples, independently of the generator: b = f(0), a = f(1) - f(0)."""
    shown = {int(x): int(y) for x, y in re.findall(r"f\((-?\d+)\)=(-?\d+)", prompt)}
    return shown[1] - shown[0], shown[0]


def _hidden_cases(task: Task) -> list[tuple[int, int]]:
    lines = task.reference["test"].splitlines()
    assert lines[0] == "def check(candidate):"
    cases = [_ASSERT.match(line) for line in lines[1:]]
    assert all(cases), task.reference["test"]
    return [(int(m.group(1)), int(m.group(2))) for m in cases if m]


def test_prompt_hidden_tests_and_demonstration_agree_with_the_line():
    source = LinearCodeSource(seed=0, eval_size=16, hidden_tests=5)
    for task in source.sample(50) + source.eval_tasks(16):
        a, b = _line_from_prompt(task.prompt)
        assert (a, b) == (task.meta["slope"], task.meta["intercept"])
        assert 1 <= a <= 9 and 0 <= b <= 99
        assert task.prompt == f"f(0)={b} f(1)={a + b} f(2)={2 * a + b}\n"
        assert task.meta["response"] == f"def f(x): return {a}*x+{b}"
        assert task.verifier == "unit_tests" and task.reference["entry_point"] == "f"
        cases = _hidden_cases(task)
        assert len(cases) == 5 and len({x for x, _ in cases}) == 5
        assert all(x not in (0, 1, 2) and y == a * x + b for x, y in cases)  # hidden: never a shown input


def test_the_sandboxed_verifier_passes_the_demonstration_and_fails_wrong_programs():
    from verifiers.registry import load
    from verifiers.sandbox import SandboxUnavailable, resolve_isolation

    try:
        resolve_isolation("auto")
    except SandboxUnavailable as exc:  # pragma: no cover - machines without bwrap and unshare
        pytest.skip(f"no sandbox: {exc}")
    verifier = load("unit_tests")
    source = LinearCodeSource(seed=1, eval_size=8)
    for task in source.sample(2) + source.eval_tasks(1):
        a, b = task.meta["slope"], task.meta["intercept"]
        table = ", ".join(f"{x}: {a * x + b}" for x in range(3))
        programs = {
            task.meta["response"]: 1.0,
            f"```python\ndef f(x):\n    return {b} + x * {a}\n```": 1.0,  # same function, other form, fenced
            program(a, a + b): 0.0,  # the flawed teacher's program: intercept read off f(1)
            program(a + 1, b): 0.0,
            f"def f(x): return {{{table}}}[x]": 0.0,  # right on every shown example, wrong on the hidden ones
            "def f(x) return 1": 0.0,  # syntax error
        }
        for code, expected in programs.items():
            verdict = verifier.verify(code, task)
            assert verdict.score == expected, (code, task.reference, verdict)


def test_a_flawed_teacher_reads_the_intercept_off_f1_at_the_configured_rate():
    source = LinearCodeSource(seed=0, eval_size=8, teacher_accuracy=0.4)
    tasks = source.sample(2000)
    right = 0
    for task in tasks:
        a, b = task.meta["slope"], task.meta["intercept"]
        assert task.meta["response"] in (program(a, b), program(a, a + b))
        assert all(y == a * x + b for x, y in _hidden_cases(task))  # the tests always check the right line
        right += task.meta["response"] == program(a, b)
    assert 0.37 < right / len(tasks) < 0.43  # binomial(2000, 0.4): std 0.011
    assert all(t.meta["response"] == program(t.meta["slope"], t.meta["intercept"]) for t in source.eval_tasks(8))
    docs = list(source.corpus(1000))
    assert 0.35 < sum(doc.endswith(f"+{doc.split()[0].removeprefix('f(0)=')}") for doc in docs) / 1000 < 0.45
    assert LinearCodeSource(seed=0, eval_size=8, teacher_accuracy=0.4).sample(50) == tasks[:50]  # seeded


def test_stream_is_reproducible_and_resumable():
    a, b = LinearCodeSource(seed=7), LinearCodeSource(seed=7)
    first = a.sample(5)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    rest = a.sample(7)
    b.load_state_dict(state)
    assert b.sample(7) == rest
    assert LinearCodeSource(seed=7).sample(12) == first + rest  # chunking does not change the stream
    assert [t.prompt for t in LinearCodeSource(seed=8).sample(12)] != [t.prompt for t in first + rest]
    with pytest.raises(ValueError, match="seed 1"):
        LinearCodeSource(seed=2).load_state_dict(LinearCodeSource(seed=1).state_dict())


def test_held_out_set_is_fixed_and_disjoint():
    # max_slope 2, max_intercept 9: 2 * 10 = 20 problems, 10 of them held out
    source = LinearCodeSource(max_slope=2, max_intercept=9, seed=3, eval_size=10)
    held = [t.prompt for t in source.eval_tasks(10)]
    assert len(set(held)) == 10
    assert held == [t.prompt for t in LinearCodeSource(max_slope=2, max_intercept=9, seed=99,
                                                       eval_size=10).eval_tasks(10)]
    assert source.eval_tasks(4) == source.eval_tasks(10)[:4]
    trained = {t.prompt for t in source.sample(500)}
    pretrained = {doc.split("\n")[0] + "\n" for doc in source.corpus(300)}
    assert not set(held) & trained and not set(held) & pretrained
    assert len(trained) == 20 - 10  # 500 draws cover every remaining problem
    with pytest.raises(ValueError, match="asked for 11 held-out tasks"):
        source.eval_tasks(11)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_slope": 0}, "task.linear_code.max_slope must be >= 1"),
        ({"max_intercept": -1}, "task.linear_code.max_intercept must be >= 0"),
        ({"examples": 1}, "task.linear_code.examples must be >= 2"),
        ({"hidden_tests": 0}, "task.linear_code.hidden_tests must be between 1 and 38"),
        ({"teacher_accuracy": 1.5}, "task.linear_code.teacher_accuracy=1.5"),
        ({"max_slope": 1, "max_intercept": 9, "eval_size": 6}, "task.eval_size=6 must be between 0 and half of the 10"),
    ],
)
def test_bad_knobs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LinearCodeSource(**kwargs)


def test_loaded_by_entry_point_and_by_the_experiment():
    from engine.config import compose_config

    cfg = TaskConfig(linear_code=LinearCodeConfig(max_slope=3, examples=2, teacher_accuracy=0.5), eval_size=8)
    source = load_task_source("linear_code", cfg, seed=4)
    assert isinstance(source, LinearCodeSource) and isinstance(source, TaskSource)
    assert (source.max_slope, source.examples, source.teacher_accuracy, source.seed) == (3, 2, 0.5, 4)
    assert source.sample(3) == LinearCodeSource(max_slope=3, examples=2, seed=4, eval_size=8,
                                                teacher_accuracy=0.5).sample(3)
    experiment = compose_config(["experiment=code_demo", "task.linear_code.teacher_accuracy=0.4"])
    assert experiment.task.source == "linear_code" and experiment.task.linear_code.teacher_accuracy == 0.4


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_two_rl_steps_scored_by_the_sandbox_log_a_pass_rate(ray_local, tmp_path: Path) -> None:
    from engine.cli import main
    from engine.metrics import read_metrics

    # The tiny model is built from the task corpus (random init): its programs fail, but every one of
    # them must be judged by the sandbox (a sandbox error would be a None verdict, counted as dropped).
    assert main(["train", "experiment=code_demo", "stage=rl", "steps=2", "progress=false", f"runs_dir={tmp_path}",
                 "corpus_docs=300", "task.eval_size=4", "rl.prompts_per_step=4", "rollout.n=4",
                 "learner.batch_size=16", "learner.micro_batch_size=16", "rollout.kv_cache_gib=0.5",
                 f"rollout.shm_dir={tmp_path}", "cluster.num_cpus=4", "model.initializer_range=0.3"]) == 0
    records = read_metrics(tmp_path / "code_demo" / "rl" / "metrics.jsonl")
    by_step = {r["step"]: r for r in records}
    assert sorted(by_step) == [0, 1, 2]
    for step in (1, 2):
        record = by_step[step]
        assert 0.0 <= record["rollout/reward_mean"] <= 1.0
        assert record["verifier/dropped_frac"] == 0.0
        assert record["perf/verify_s"] > 0 and record["rollout/weight_version"] == step
    for step in (0, 2):  # the baseline and the final held-out pass rates
        assert 0.0 <= by_step[step]["eval/accuracy"] <= 1.0 and 0.0 <= by_step[step]["eval/pass@1"] <= 1.0
