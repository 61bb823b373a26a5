"""Task generators: linear equations (checked by sympy substitution) and code reasoning (checked by
running each program in the sandbox as a plain script); determinism, resume, held-out disjointness,
difficulty knobs and config errors."""

from __future__ import annotations

import re

import pytest
import sympy
from sympy.parsing.sympy_parser import parse_expr

from engine.tasks import TaskConfig, TaskSource, load_task_source
from engine.tasks.algebra import FORMS, LinearEquationsSource
from verifiers.registry import load
from verifiers.sandbox import SandboxUnavailable, resolve_isolation, run_python

X = sympy.Symbol("x")


def _sandbox_problem() -> str | None:
    try:
        resolve_isolation("auto")
    except SandboxUnavailable as exc:  # pragma: no cover - machines without bwrap and unshare
        return str(exc)
    return None


needs_sandbox = pytest.mark.skipif(_sandbox_problem() is not None, reason=f"no sandbox: {_sandbox_problem()}")

# ---------------------------------------------------------------- linear equations


def _sides(task):
    left, right = task.meta["equation"].split("=")
    return parse_expr(left, local_dict={"x": X}), parse_expr(right, local_dict={"x": X})


@pytest.mark.parametrize("integer_solutions", [True, False])
def test_equation_answers_satisfy_their_equation_by_substitution(integer_solutions):
    source = LinearEquationsSource(coefficient_range=6, integer_solutions=integer_solutions, seed=1, eval_size=16)
    tasks = source.sample(200) + source.eval_tasks(16)
    for task in tasks:
        assert task.prompt == f"Solve for x: {task.meta['equation']}\n"
        assert task.verifier == "math"
        left, right = _sides(task)
        value = sympy.Rational(task.reference)  # "5" or "-3/7"
        assert sympy.simplify(left.subs(X, value) - right.subs(X, value)) == 0, task
        assert sympy.simplify(left.subs(X, value + 1) - right.subs(X, value + 1)) != 0, task  # linear: one root
    fractions = sum("/" in t.reference for t in tasks)
    assert (fractions == 0) if integer_solutions else (fractions > len(tasks) // 4)


def test_equation_demonstrations_satisfy_the_math_verifier():
    verifier = load("math")
    for task in LinearEquationsSource(integer_solutions=False, seed=2, eval_size=4).sample(60):
        assert task.meta["response"] == f"\\boxed{{{task.reference}}}"
        assert verifier.verify(task.meta["response"], task).score == 1.0, task
        wrong = sympy.Rational(task.reference) + sympy.Rational(1, 2)
        assert verifier.verify(f"\\boxed{{{wrong}}}", task).score == 0.0, task


def test_equations_are_deterministic_and_resume_exactly():
    first = LinearEquationsSource(seed=5, eval_size=8)
    whole = [t.prompt for t in first.sample(30)]
    again = LinearEquationsSource(seed=5, eval_size=8)
    head = [t.prompt for t in again.sample(12)]
    resumed = LinearEquationsSource(seed=5, eval_size=8)
    resumed.load_state_dict(again.state_dict())
    assert head + [t.prompt for t in resumed.sample(18)] == whole
    other = LinearEquationsSource(seed=6, eval_size=8)
    assert [t.prompt for t in other.sample(30)] != whole
    assert [t.prompt for t in other.eval_tasks(8)] == [t.prompt for t in first.eval_tasks(8)]  # seed-free
    with pytest.raises(ValueError, match="seed 5"):
        other.load_state_dict(first.state_dict())


def test_equation_training_and_corpus_never_hold_a_held_out_equation():
    # a tiny space (one_sided, range 2: a, b in {-2, -1, 1, 2}, x in -2..2: 4 * 4 * 5 = 80) with 40 held out, so
    # training draws land on held-out ones all the time and must be redrawn
    source = LinearEquationsSource(coefficient_range=2, forms=["one_sided"], seed=0, eval_size=40)
    held = {t.prompt for t in source.eval_tasks(40)}
    assert len(held) == 40
    assert not held & {t.prompt for t in source.sample(400)}
    assert not any(doc.startswith(tuple(held)) for doc in source.corpus(200))


def test_equation_knobs_change_the_tasks():
    def numbers(source):
        return [abs(int(n)) for t in source.sample(200) for n in re.findall(r"\d+", t.meta["equation"])]

    assert max(numbers(LinearEquationsSource(coefficient_range=3, integer_solutions=False, eval_size=4))) <= 3
    assert max(numbers(LinearEquationsSource(coefficient_range=50, integer_solutions=False, eval_size=4))) > 40
    patterns = {"one_sided": r"^-?(\d+\*)?x [+-] \d+ = -?\d+$", "bracket": r"^-?\d+\*\(x [+-] \d+\) = -?\d+$",
                "two_sided": r"^-?(\d+\*)?x [+-] \d+ = -?(\d+\*)?x( [+-] \d+)?$", "divided": r"^x/\d+ [+-] \d+ = -?\d+$"}
    for form in FORMS:
        for task in LinearEquationsSource(forms=[form], eval_size=4).sample(50):
            assert re.match(patterns[form], task.meta["equation"]), (form, task.meta["equation"])


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"forms": ["quadratic"]}, r"task.linear_equations.forms=\['quadratic'\]"),
        ({"forms": []}, "non-empty subset"),
        ({"coefficient_range": 0}, "coefficient_range must be >= 1"),
        ({"coefficient_range": 1, "forms": ["bracket", "one_sided"]}, r"includes \['bracket'\].*>= 2"),
    ],
)
def test_equation_config_errors_name_the_knob(knobs, message):
    cfg = TaskConfig(source="linear_equations")
    for key, value in knobs.items():
        setattr(cfg.linear_equations, key, value)
    with pytest.raises(ValueError, match=message):
        load_task_source("linear_equations", cfg, seed=0)


def test_equation_eval_size_is_bounded_by_the_space():
    with pytest.raises(ValueError, match="half of the 80 distinct equations"):
        LinearEquationsSource(coefficient_range=2, forms=["one_sided"], eval_size=41)


def test_linear_equations_load_through_the_entry_point():
    cfg = TaskConfig(source="linear_equations", eval_size=8)
    source = load_task_source("linear_equations", cfg, seed=0)
    assert isinstance(source, TaskSource) and isinstance(source, LinearEquationsSource)
    # code_reasoning loads the same way in the `code_source` fixture below (it needs the sandbox)


# ---------------------------------------------------------------- code reasoning


@pytest.fixture(scope="module")
def code_source():
    from engine.tasks.code_reasoning import CodeReasoningSource

    cfg = TaskConfig(source="code_reasoning", eval_size=8)
    cfg.code_reasoning.depth, cfg.code_reasoning.statements = 2, 4
    source = load_task_source("code_reasoning", cfg, seed=3)  # through the entry point
    assert isinstance(source, CodeReasoningSource)
    return source


@pytest.fixture(scope="module")
def code_tasks(code_source):
    return code_source.sample(16) + code_source.eval_tasks(8)


@needs_sandbox
def test_code_outputs_match_running_each_program_as_a_script(code_tasks):
    # Independent path: the program is the sandboxed `__main__` script itself and prints repr(f(x))
    # for each input (the generator got its outputs through the exec-based harness of code_output).
    for task in code_tasks:
        script = task.meta["program"] + "\n" + "".join(f"print(repr(f({x})))\n" for x in task.meta["inputs"])
        result = run_python(script, timeout_s=20.0)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == task.meta["outputs"], task.meta["program"]
        assert len(set(task.meta["outputs"])) > 1  # the output depends on the input


@needs_sandbox
def test_code_demonstrations_pass_and_wrong_answers_fail_their_verifiers(code_tasks):
    verifiers = {name: load(name) for name in ("code_output", "unit_tests")}
    modes = {t.meta["mode"] for t in code_tasks}
    assert modes == {"deduction", "abduction", "induction"}
    for task in code_tasks:
        verifier = verifiers[task.verifier]
        assert verifier.verify(task.meta["response"], task).score == 1.0, (task.prompt, task.meta["response"])
        inputs, outputs = task.meta["inputs"], task.meta["outputs"]
        if task.meta["mode"] == "deduction":
            assert task.verifier == "code_output" and task.prompt.startswith("```python\ndef f(xs):")
            wrong = next(y for y in outputs if y != outputs[0])  # another input's output
            assert verifier.verify(f"\\boxed{{{wrong}}}", task).score == 0.0
        elif task.meta["mode"] == "abduction":
            assert task.verifier == "code_output" and f"returns {outputs[0]}." in task.prompt
            wrong = next(x for x, y in zip(inputs, outputs) if y != outputs[0])
            assert verifier.verify(f"\\boxed{{{wrong}}}", task).score == 0.0
        else:
            assert task.verifier == "unit_tests"
            shown = task.prompt.count(" == ")
            assert shown == 3 and task.meta["program"] not in task.prompt
            # a program that tabulates the shown examples fails on the hidden ones
            table = {x: y for x, y in zip(inputs[:shown], outputs)}
            cheat = "def f(xs):\n" + "".join(f"    if xs == {x}:\n        return {y}\n" for x, y in table.items())
            assert verifier.verify(f"```python\n{cheat}```", task).score == 0.0


@needs_sandbox
def test_code_tasks_are_deterministic_and_resume_exactly(code_source):
    from engine.tasks.code_reasoning import CodeReasoningSource

    def fresh(seed=3):
        return CodeReasoningSource(statements=4, depth=2, seed=seed, eval_size=8)

    whole = [t.prompt for t in fresh().sample(10)]
    assert [t.prompt for t in code_source.eval_tasks(8)] == [t.prompt for t in fresh(seed=9).eval_tasks(8)]
    first = fresh()
    head = [t.prompt for t in first.sample(4)]
    resumed = fresh()
    resumed.load_state_dict(first.state_dict())
    assert head + [t.prompt for t in resumed.sample(6)] == whole
    assert [t.prompt for t in fresh(seed=4).sample(10)] != whole


@needs_sandbox
def test_code_training_never_holds_a_held_out_program():
    from engine.tasks.code_reasoning import CodeReasoningSource

    # statements=1, depth=0: only ~25 programs whose output depends on the input; 12 are held out
    source = CodeReasoningSource(statements=1, depth=0, seed=0, eval_size=12)
    held = {t.meta["program"] for t in source.eval_tasks(12)}
    assert len(held) == 12
    train = {t.meta["program"] for t in source.sample(80)}
    assert train and not held & train
    assert not any(p in doc for doc in source.corpus(40) for p in held)


@needs_sandbox
def test_code_knobs_change_the_programs():
    from engine.tasks.code_reasoning import CodeReasoningSource

    def body_lines(program):
        return [line for line in program.splitlines()[1:] if not re.match(r"    (acc = 0|out = \[\]|return )", line)]

    flat = CodeReasoningSource(statements=2, depth=0, eval_size=4, modes=["deduction"]).sample(20)
    deep = CodeReasoningSource(statements=5, depth=3, eval_size=4, modes=["induction"]).sample(20)
    for task in flat:
        assert task.meta["mode"] == "deduction" and task.verifier == "code_output"
        lines = body_lines(task.meta["program"])
        assert len(lines) == 2 and all(re.match(r"    \S", line) for line in lines)  # no blocks
    for task in deep:
        assert task.meta["mode"] == "induction" and task.verifier == "unit_tests"
        lines = body_lines(task.meta["program"])
        assert len(lines) == 5
        assert max(len(line) - len(line.lstrip()) for line in lines) == 4 * 4  # three blocks deep


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"modes": ["deduction", "guessing"]}, r"task.code_reasoning.modes=\['deduction', 'guessing'\]"),
        ({"statements": 0}, "statements must be >= 1"),
        ({"statements": 2, "depth": 2}, r"depth=2: expected 0 .. 4 and at most statements - 1 = 1"),
        ({"list_len": 1, "max_value": 2}, "allow only 3 inputs"),
        ({"isolation": "docker"}, "isolation='docker'"),
    ],
)
def test_code_config_errors_name_the_knob(knobs, message):
    cfg = TaskConfig(source="code_reasoning", eval_size=4)
    for key, value in knobs.items():
        setattr(cfg.code_reasoning, key, value)
    with pytest.raises(ValueError, match=message):
        load_task_source("code_reasoning", cfg, seed=0)


@needs_sandbox
def test_code_knobs_too_narrow_for_the_held_out_set_fail_clearly():
    from engine.tasks.code_reasoning import CodeReasoningSource

    with pytest.raises(ValueError, match=r"only \d+ distinct held-out programs for task.eval_size=64"):
        CodeReasoningSource(statements=1, depth=0, eval_size=64)


# ---------------------------------------------------------------- reasoning-gym adapter (optional extra)


def test_reasoning_gym_tasks_are_scored_by_their_own_scorer():
    pytest.importorskip("reasoning_gym")
    verifier = load("reasoning_gym")
    for name in ("chain_sum", "spell_backward"):
        source = load_task_source("reasoning_gym", _gym_config(name), seed=0)
        for task in source.sample(5) + source.eval_tasks(4):
            assert task.verifier == "reasoning_gym" and task.prompt.endswith("<answer>...</answer>.\n")
            answer = task.reference["entry"]["answer"]
            assert task.meta["response"] == f"<answer>{answer}</answer>"
            assert verifier.verify(f"thinking... {task.meta['response']}", task).score == 1.0
            assert verifier.verify("<answer>@@@</answer>", task).score == 0.0
            assert verifier.verify(answer, task).score == 0.0  # no answer tags


def test_reasoning_gym_streams_resume_and_never_hold_a_held_out_question():
    pytest.importorskip("reasoning_gym")
    cfg = _gym_config("basic_arithmetic", eval_size=40)
    cfg.reasoning_gym.options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                 "operators": ["+"], "size": 50}  # 100 sums; chunks of 50 items
    first = load_task_source("reasoning_gym", cfg, seed=1)
    whole = [t.prompt for t in first.sample(120)]  # crosses two chunk boundaries
    again = load_task_source("reasoning_gym", cfg, seed=1)
    head = [t.prompt for t in again.sample(70)]
    resumed = load_task_source("reasoning_gym", cfg, seed=1)
    resumed.load_state_dict(again.state_dict())
    assert head + [t.prompt for t in resumed.sample(50)] == whole
    held = {t.prompt for t in first.eval_tasks(40)}
    assert len(held) == 40 and not held & set(whole)
    assert held == {t.prompt for t in load_task_source("reasoning_gym", cfg, seed=2).eval_tasks(40)}


def test_reasoning_gym_config_errors_name_the_knob():
    pytest.importorskip("reasoning_gym")
    with pytest.raises(ValueError, match="task.reasoning_gym.dataset='no_such_set' is not a reasoning-gym dataset"):
        load_task_source("reasoning_gym", _gym_config("no_such_set"), seed=0)
    cfg = _gym_config("chain_sum")
    cfg.reasoning_gym.options = {"no_such_knob": 1}
    with pytest.raises(ValueError, match=r"task.reasoning_gym.options=\{'no_such_knob': 1\}"):
        load_task_source("reasoning_gym", cfg, seed=0)


def _gym_config(dataset: str, eval_size: int = 4) -> TaskConfig:
    cfg = TaskConfig(source="reasoning_gym", eval_size=eval_size)
    cfg.reasoning_gym.dataset = dataset
    return cfg
