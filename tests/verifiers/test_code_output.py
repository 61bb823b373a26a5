"""`code_output`: deduction answers compared by repr, abduction answers run through the program in the sandbox."""

from __future__ import annotations

import pytest

from verifiers.base import Task
from verifiers.code_output import CodeOutputVerifier, run_calls
from verifiers.registry import load
from verifiers.sandbox import Limits, SandboxUnavailable, resolve_isolation

try:
    resolve_isolation("auto")
except SandboxUnavailable as exc:  # pragma: no cover - machines without bwrap and unshare
    pytest.skip(f"no sandbox: {exc}", allow_module_level=True)

SUM_EVENS = "def f(xs):\n    return sum(x for x in xs if x % 2 == 0)\n"
LOOPS_ON_NEGATIVE = "def f(n):\n    while n != 0:\n        n -= 1\n    return 'done'\n"


@pytest.fixture(scope="module")
def verifier() -> CodeOutputVerifier:
    return CodeOutputVerifier(timeout_s=2.0)


def deduction(output: str) -> Task:
    return Task("d", "prompt", {"mode": "deduction", "output": output}, "code_output")


def abduction(program: str, output: str) -> Task:
    return Task("a", "prompt", {"mode": "abduction", "program": program, "entry_point": "f", "output": output},
                "code_output")


def test_registered_under_its_entry_point():
    assert isinstance(load("code_output"), CodeOutputVerifier)


@pytest.mark.parametrize(
    ("response", "output", "score"),
    [
        ("\\boxed{[3, 1]}", "[3, 1]", 1.0),
        ("so \\boxed{[3,1]}", "[3, 1]", 1.0),  # same value, other spacing: repr(literal) matches
        ("Answer: 'ab c'", "'ab c'", 1.0),
        ("\\boxed{(3, 1)}", "[3, 1]", 0.0),  # a tuple is not the list
        ("\\boxed{3.0}", "3", 0.0),  # type counts: 3.0 is not 3
        ("\\boxed{True}", "1", 0.0),
        ("\\boxed{4}", "3", 0.0),
        ("\\boxed{__import__('os').getpid()}", "3", 0.0),  # code is not a literal: never evaluated
        ("no answer here", "3", 0.0),
    ],
)
def test_deduction_compares_the_literal_value_by_repr(verifier, response, output, score):
    assert verifier.verify(response, deduction(output)).score == score


def test_abduction_accepts_any_input_that_gives_the_output(verifier):
    task = abduction(SUM_EVENS, "6")
    for answer in ("[2, 4]", "[6]", "[1, 6, 3]", "(2, 2, 2)"):  # 2+4 = 6 = 6 = 2+2+2
        verdict = verifier.verify(f"\\boxed{{{answer}}}", task)
        assert verdict.score == 1.0, (answer, verdict)
    wrong = verifier.verify("\\boxed{[2, 3]}", task)
    assert wrong.score == 0.0 and "gives 2, not 6" in wrong.reason


def test_abduction_failures_score_zero_with_the_reason(verifier):
    crash = verifier.verify("\\boxed{['a']}", abduction(SUM_EVENS, "6"))  # 'a' % 2 raises
    assert crash.score == 0.0 and "TypeError" in crash.reason
    hang = verifier.verify("\\boxed{-1}", abduction(LOOPS_ON_NEGATIVE, "'done'"))  # n = -1 never reaches 0
    assert hang.score == 0.0 and "timeout" in hang.reason and hang.metrics["verifier/timeouts"] == 1.0
    assert verifier.verify("\\boxed{3}", abduction(LOOPS_ON_NEGATIVE, "'done'")).score == 1.0
    code = verifier.verify("\\boxed{open('/etc/passwd').read()}", abduction(SUM_EVENS, "6"))
    assert code.score == 0.0 and "ValueError" in code.reason  # literal_eval refuses calls


@pytest.mark.parametrize(
    "reference",
    [None, "6", {"mode": "guess", "output": "6"}, {"mode": "abduction", "output": "6"}, {"mode": "deduction"}],
)
def test_an_unusable_reference_cannot_be_judged(verifier, reference):
    verdict = verifier.verify("\\boxed{6}", Task("t", "p", reference, "code_output"))
    assert verdict.score is None and "reference for code_output" in verdict.reason


def test_run_calls_runs_many_calls_in_one_sandbox_run():
    calls = [(SUM_EVENS, "f", "[1, 2, 4]"), ("def f(x):\n    print('noise')\n    return x * 2", "f", "'ab'"),
             (SUM_EVENS, "f", "[1, 'x']"), ("def g(x): return x", "f", "1")]
    results = run_calls(calls, Limits(timeout_s=10.0))
    assert [(r.ok, r.text) for r in results[:2]] == [(True, "6"), (True, "'abab'")]  # prints don't leak
    assert not results[2].ok and results[2].text.startswith("TypeError")
    assert not results[3].ok and results[3].text.startswith("KeyError")
