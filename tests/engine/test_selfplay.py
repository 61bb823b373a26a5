"""Proposer-solver self-play (`engine.selfplay`): proposals rejected for the right reason in the real
sandbox, learnability by hand, the buffer's duplicate filters, the contamination drop, the SFT
demonstrations being valid proposals, the buffer a resumed run gets back from its checkpoint, and a
2-step run through the real loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.collector_base import CollectorContext
from engine.config import AssayConfig
from engine.selfplay import (
    CodeTask,
    SelfPlayCollector,
    SelfPlaySource,
    TaskBuffer,
    check_proposals,
    jaccard,
    learnability,
    parse_proposal,
    trigrams,
)
from engine.tasks.base import CodeReasoningConfig, TaskConfig
from verifiers.sandbox import Limits, resolve_isolation

NAN = float("nan")
LIMITS = Limits(timeout_s=1.0, memory_mb=256, max_output_bytes=1 << 16)


def _proposal(body: str, argument: str = "[1, 2, 3]", header: str = "") -> str:
    return f"```python\n{header}def f(xs):\n{body}\n```\nInput: {argument}\n"


def _task(program: str, argument: str = "[1, 2, 3]") -> CodeTask:
    task, reason = parse_proposal(_proposal(program, argument))
    assert task is not None, reason
    return task


def test_invalid_proposals_are_rejected_with_the_right_reason_in_the_sandbox():
    buffer = TaskBuffer(size=8, near=0.9)
    buffer.add(_task("    return sum(xs) * 7", "[4, 4]"))
    texts = {
        "valid": _proposal("    acc = 0\n    for x in xs:\n        acc += x * 2\n    return acc"),
        "crash": _proposal("    return xs[10]"),
        "loop": _proposal("    while True:\n        pass"),
        "random": _proposal("    return random.randint(0, 10 ** 9)", header="import random\n"),
        "time": _proposal("    return time.time_ns()", header="import time\n"),
        "id": _proposal("    return id(xs)"),
        "hash": _proposal("    return list({str(x) for x in range(20)})"),  # set order: per-process hash seed
        "long": _proposal("    return xs * 100"),
        "format": "def f(xs): return xs",
        "syntax": _proposal("    return (("),
        "no_f": "```python\ndef g(xs):\n    return xs\n```\nInput: [1]",
        "input": _proposal("    return xs", "[1, 'a']"),
        # the buffer's task, written differently (spacing, a comment): the same after ast.unparse
        "duplicate": _proposal("    return   sum(xs)*7  # same", "[4, 4]"),
        "again": _proposal("    acc = 0\n    for x in xs:\n        acc += x * 2\n    return acc"),  # as "valid"
    }
    checked = dict(zip(texts, check_proposals(list(texts.values()), buffer, LIMITS, resolve_isolation("auto"), 100)))
    reasons = {name: reason for name, (_, reason) in checked.items()}
    assert reasons == {"valid": "", "crash": "crash", "loop": "timeout", "random": "nondeterministic",
                       "time": "nondeterministic", "id": "nondeterministic", "hash": "nondeterministic",
                       "long": "long_output", "format": "format", "syntax": "syntax", "no_f": "no_f",
                       "input": "input", "duplicate": "duplicate", "again": "duplicate"}
    task, _ = checked["valid"]
    assert task is not None and task.output == "12" and task.argument == "[1, 2, 3]"  # (1 + 2 + 3) * 2
    assert all(t is None for name, (t, _) in checked.items() if name != "valid")


def test_learnability_of_hand_built_solve_rates():
    rates = torch.tensor([0.0, 0.25, 0.5, 0.875, 1.0, NAN])
    got = learnability(rates)
    # 1 - r inside (0, 1); 0 for never and always solved (nothing to learn); NaN (not judged) stays NaN
    assert got[:5].tolist() == [0.0, 0.75, 0.5, 0.125, 0.0]
    assert math.isnan(got[5])


def test_the_buffer_filters_exact_and_near_duplicates():
    program = "def f(xs):\n    return xs"
    # tokens of "def f(xs):\n    return xs\n[1]": def f ( xs ) : return xs [ 1 ] = 11 tokens, 9 trigrams;
    # with [2] instead, the 2 trigrams holding the number differ: Jaccard 7 / (9 + 9 - 7) = 7/11
    assert jaccard(trigrams(program, "[1]"), trigrams(program, "[2]")) == pytest.approx(7 / 11)
    loose, strict = TaskBuffer(size=8, near=0.6), TaskBuffer(size=8, near=0.9)
    for buffer in (loose, strict):
        buffer.add(CodeTask(program, "[1]", "[1]"))
        assert buffer.duplicate(CodeTask(program, "[1]", "")) == "duplicate"
    assert loose.duplicate(CodeTask(program, "[2]", "")) == "near_duplicate"  # 7/11 = 0.64 >= 0.6
    assert strict.duplicate(CodeTask(program, "[2]", "")) == ""  # 0.64 < 0.9
    other = CodeTask("def f(xs):\n    return sorted(xs)[::-1]", "[3, 1]", "")
    assert strict.duplicate(other) == ""
    assert strict.duplicate(other, also=[other]) == "duplicate"  # an earlier proposal of the same step
    small = TaskBuffer(size=2, near=0.9)
    for i in range(3):
        small.add(CodeTask(program, f"[{i}]", f"[{i}]"))
    assert [t.argument for t in small.tasks] == ["[1]", "[2]"]  # the oldest went first


def test_tasks_that_overlap_the_eval_set_are_dropped():
    eval_task = _task("    acc = 0\n    for x in xs:\n        acc += x * 3\n        acc -= len(xs)\n    return acc")
    state = SelfPlayCollector(CollectorContext(AssayConfig(), None, None, [], Path("unused"),  # type: ignore[arg-type]
                                               [eval_task.task("eval-0")]))
    same_program_other_input = CodeTask(eval_task.program, "[5]", "10")
    unrelated = _task("    return sorted(xs)")
    # the first shares "python def f xs acc 0 for x in xs acc x 3 acc len xs return acc what does f" with
    # the eval prompt (21 word tokens; only the input differs); the second shares "python def f xs" and the
    # template "return put the value in boxed"
    assert state.add([same_program_other_input, unrelated], n=20) == [True, False]
    assert state.buffer.tasks == [unrelated]


def test_sft_demonstrations_are_valid_proposals():
    cfg = TaskConfig(eval_size=8, code_reasoning=CodeReasoningConfig(modes=["deduction"], list_len=3, max_value=5))
    source = SelfPlaySource.from_config(cfg, seed=0)
    tasks = source.sample(12)
    demos = [t for t in tasks if t.meta["mode"] == "proposal"]
    assert demos and len(demos) < len(tasks)  # a mix
    assert all(t.meta["mode"] == "deduction" for t in source.eval_tasks(8))
    checked = check_proposals([t.meta["response"] for t in demos], TaskBuffer(64, 1.0), LIMITS,
                              resolve_isolation("auto"), 200)
    assert [reason for _, reason in checked] == [""] * len(demos)
    # resume: the same stream from a state_dict
    state = source.state_dict()
    again = SelfPlaySource.from_config(cfg, seed=0)
    again.load_state_dict(state)
    assert [t.prompt for t in again.sample(4)] == [t.prompt for t in source.sample(4)]


@pytest.fixture(scope="module")
def code_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random tiny Llama whose tokenizer was trained on code_reasoning text."""
    from engine.models import ModelConfig, prepare_model_dir
    from engine.tasks.code_reasoning import CodeReasoningSource

    corpus = list(CodeReasoningSource(modes=["deduction"], list_len=3, max_value=5, eval_size=8).corpus(64))
    out = tmp_path_factory.mktemp("selfplay_model") / "tiny"
    return str(prepare_model_dir(ModelConfig(initializer_range=0.3), corpus, out))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_two_selfplay_steps_through_the_real_loop(ray_local, code_model, tmp_path) -> None:
    from engine.checkpoint import read_state
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    args = ["stage=rl", "progress=false", f"runs_dir={tmp_path}", f"model.path={code_model}",
            "task.source=code_reasoning", "task.code_reasoning.modes=[deduction]", "task.code_reasoning.list_len=3",
            "task.code_reasoning.max_value=5", "task.eval_size=4", "rl.collector=selfplay", "rl.prompts_per_step=4",
            "selfplay.proposer_prompts=1", "selfplay.seed_tasks=4", "rollout.n=4", "rollout.max_tokens=8",
            "rollout.temperature=1.0", "rollout.kv_cache_gib=0.5", f"rollout.shm_dir={tmp_path}",
            "learner.batch_size=16", "learner.micro_batch_size=16", "learner.lr=1e-2", "learner.lr_schedule=constant",
            "learner.warmup_steps=0", "cluster.learners=1", "cluster.num_cpus=4", "save_every=1"]
    result = run_stage(compose_config([*args, "steps=2"]))
    steps = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}
    assert sorted(steps) == [0, 1, 2] and "eval/accuracy" in steps[0] and "eval/accuracy" in steps[2]
    for step in (1, 2):
        m = steps[step]
        # 1 proposer group + 3 solver groups (replays of the 4 seed tasks; a random model proposes no valid task)
        assert m["selfplay/trained_groups"] == 4 and m["selfplay/buffer"] >= 4
        invalid = sum(m[k] for k in m if k.startswith("selfplay/invalid_"))
        assert invalid + m["selfplay/valid_frac"] * 4 == pytest.approx(4)  # every proposal valid or counted
        assert {"selfplay/contaminated_dropped", "selfplay/proposer_reward", "rollout/reward_mean",
                "learner/loss"} <= set(m)
        assert m["selfplay/valid_frac"] > 0 or m["selfplay/proposer_reward"] == -1.0  # invalid_reward
    assert (result.run_dir / "selfplay.png").stat().st_size > 0
    final = read_state(result.run_dir / "final")["collector"]["buffer"]  # the collector's state after step 2
    assert len(final) == steps[2]["selfplay/buffer"]
    step_1 = read_state(result.run_dir / "checkpoints" / "step_000001")["collector"]["buffer"]  # save_every=1
    assert len(step_1) == steps[1]["selfplay/buffer"] and final[:len(step_1)] == step_1[:len(final)]


def test_a_resumed_run_continues_from_the_checkpointed_buffer(tmp_path, capsys) -> None:
    """The collector's `state_dict` (what a checkpoint records) gives a fresh collector the same buffer
    without touching the task stream; a collector with no state loaded (a checkpoint without it) seeds a
    fresh buffer at its first step and says so."""
    from engine.collectors import collector_class
    from engine.config import compose_config

    cfg = compose_config([f"runs_dir={tmp_path}", "stage=rl", "task.source=code_reasoning", "rl.collector=selfplay",
                          "task.code_reasoning.modes=[deduction]", "task.code_reasoning.list_len=3",
                          "task.code_reasoning.max_value=5", "task.eval_size=4", "selfplay.seed_tasks=3"])
    source = SelfPlaySource.from_config(cfg.task, seed=0)
    context = CollectorContext(cfg, source, None, [], tmp_path, source.eval_tasks(4))  # type: ignore[arg-type]
    saved = SelfPlayCollector(context)
    tasks = [CodeTask("def f(xs):\n    return xs[::-1]", "[1, 2]", "[2, 1]"), CodeTask("def f(xs):\n    return 5", "[]", "5")]
    assert saved.add(tasks, n=20) == [False, False]
    position = source.state_dict()
    resumed = collector_class(cfg.rl.collector)(context)
    resumed.load_state_dict(json.loads(json.dumps(saved.state_dict())))  # as the checkpoint's state.json holds it
    assert isinstance(resumed, SelfPlayCollector) and resumed.buffer.tasks == saved.buffer.tasks
    assert resumed.buffer.duplicate(CodeTask("def f(xs):\n    return 5", "[]", "")) == "duplicate"
    assert resumed.started and source.state_dict() == position  # the task stream is not touched on resume
    fresh = SelfPlayCollector(context)
    fresh.seed_buffer(step=8)
    assert "holds no task buffer; starting a fresh one" in capsys.readouterr().out
    assert len(fresh.buffer) == 3 and all(t.output for t in fresh.buffer.tasks)
