"""`CodeOutputVerifier` (`code_output`): answers about what a program returns, checked by value or by running it.

The two answer-is-data modes of Absolute Zero's code reasoning (Zhao et al. 2025,
https://arxiv.org/abs/2505.03335); the third, induction (write the program), is `unit_tests`' job.
`task.reference` says which:

- deduction `{"mode": "deduction", "output": "[3, 1]"}`: the answer is the program's return value.
  It scores 1.0 when it is a Python literal whose `repr` equals `output` (the repr of the true value,
  which the task source got by running the program). So `[3,1]` passes, while `(3, 1)`, `3.0` for
  `3` and `True` for `1` do not: stricter than Absolute Zero's `==` on evaluated objects.
- abduction `{"mode": "abduction", "program": "def f(xs): ...", "entry_point": "f", "output": "7"}`:
  the answer is an input. The program runs in the sandbox on it, as its only argument, and the answer
  scores 1.0 when `repr(f(answer)) == output`. Any input that gives the output passes, as in the paper.

The answer is found as the `math` verifier finds one in strict mode (the last `\\boxed{...}`, or a
final `Answer: ...` line; a literal with unbalanced braces must use the line) and is only ever read
with `ast.literal_eval`: the response is data, never code. The program is the task's, not the
model's; it still runs in the sandbox because a chosen input can make a trusted program loop or
allocate without bound (a timeout scores 0).

`run_calls` is the harness of one sandbox run that makes many `f(argument)` calls; the task source
`engine.tasks.code_reasoning` computes its ground truth with it, so the verifier and the generator
read a program's behaviour the same way.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from verifiers.base import Task, Verdict
from verifiers.math_extract import extract_answer
from verifiers.sandbox import Limits, RunResult, resolve_isolation, run_files

MODES = ("deduction", "abduction")
MAX_ANSWER_CHARS = 10_000
"""Longer answers score 0 unread (a literal that long is not an answer to these tasks)."""

# In-sandbox harness (stdlib only). stdin: JSON list of [program, entry_point, argument literal].
# stdout: JSON list of ["ok", repr(value)] or ["error", "Type: message"], one per call. The programs'
# own prints go to stderr so they cannot corrupt the reply.
_HARNESS = r'''
import ast, json, sys

calls = json.loads(sys.stdin.read())
reply, results = sys.stdout, []
sys.stdout = sys.stderr
for program, entry_point, argument in calls:
    try:
        namespace = {"__name__": "__program__"}
        exec(compile(program, "program.py", "exec"), namespace)
        results.append(["ok", repr(namespace[entry_point](ast.literal_eval(argument)))])
    except Exception as exc:
        results.append(["error", "%s: %s" % (type(exc).__name__, str(exc)[:200])])
reply.write(json.dumps(results))
reply.flush()
'''


@dataclass(frozen=True)
class CallResult:
    """One call of `run_calls`: `ok` and the repr of the return value, or not `ok` and the exception."""

    ok: bool
    text: str


class SandboxRunFailed(RuntimeError):
    """The sandbox run of `run_calls` ended without a reply (timeout, output cap, crash)."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        if result.timed_out:
            why = f"timeout after {result.wall_s:.1f}s"
        elif result.output_exceeded:
            why = "output limit exceeded"
        else:
            why = f"exit {result.returncode}: {result.stderr.strip()[-300:]}"
        super().__init__(f"sandbox run of the program calls failed: {why}")


def run_calls(calls: Sequence[tuple[str, str, str]], limits: Limits, isolation: str = "auto") -> list[CallResult]:
    """Run `entry_point(literal_eval(argument))` of each `(program, entry_point, argument)` in one sandbox run.

    Each call gets a fresh namespace; an exception is that call's result, a timeout (of the whole
    run) raises `SandboxRunFailed`.
    """
    if not calls:
        return []
    result = run_files({"harness.py": _HARNESS}, "harness.py", json.dumps([list(c) for c in calls]),
                       limits=limits, isolation=isolation)
    try:
        reply = json.loads(result.stdout) if result.returncode == 0 and not result.timed_out else None
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, list) or len(reply) != len(calls):
        raise SandboxRunFailed(result)
    return [CallResult(status == "ok", str(text)) for status, text in reply]


class CodeOutputVerifier:
    """Scores a deduction (the return value) or an abduction (an input) answer; see the module docstring."""

    name = "code_output"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, isolation: str = "auto") -> None:
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=1 << 16)
        self.isolation = resolve_isolation(isolation)

    def verify(self, response: str, task: Task) -> Verdict:
        """1.0 or 0.0; `None` only when the task's reference is unusable. Never raises on model output."""
        reference = task.reference
        problem = _reference_problem(reference)
        if problem:
            return Verdict(None, f"task {task.id}: {problem}")
        found = extract_answer(response, "strict") if isinstance(response, str) else None
        if found is None or found.answer is None:
            return Verdict(0.0, found.reason if found else "response is not text", {"verifier/code/extracted": 0.0})
        if len(found.answer) > MAX_ANSWER_CHARS:
            return Verdict(0.0, f"answer longer than {MAX_ANSWER_CHARS} characters", {"verifier/code/extracted": 1.0})
        if reference["mode"] == "deduction":
            return self._deduction(found.answer, reference["output"])
        return self._abduction(found.answer, reference)

    def _deduction(self, answer: str, output: str) -> Verdict:
        metrics = {"verifier/code/extracted": 1.0}
        try:
            value = ast.literal_eval(answer.strip())
        except Exception as exc:  # noqa: BLE001 - SyntaxError, ValueError, RecursionError, MemoryError...
            return Verdict(0.0, f"answer is not a Python literal ({type(exc).__name__})", metrics)
        same = repr(value) == output
        return Verdict(float(same), "same value" if same else f"{value!r} != {output}"[:300], metrics)

    def _abduction(self, answer: str, reference: dict[str, Any]) -> Verdict:
        metrics = {"verifier/code/extracted": 1.0, "verifier/timeouts": 0.0}
        call = (reference["program"], reference["entry_point"], answer.strip())
        try:
            (result,) = run_calls([call], self.limits, self.isolation)
        except SandboxRunFailed as exc:  # the chosen input made the program loop or blow up
            metrics["verifier/timeouts"] = float(exc.result.timed_out)
            return Verdict(0.0, str(exc)[:300], metrics)
        except OSError as exc:
            return Verdict(None, f"sandbox error: {exc}")
        if not result.ok:
            return Verdict(0.0, f"the program fails on that input: {result.text}"[:300], metrics)
        same = result.text == reference["output"]
        reason = "the input gives the output" if same else f"the input gives {result.text}, not {reference['output']}"
        return Verdict(float(same), reason[:300], metrics)


def _reference_problem(reference: Any) -> str:
    """Why a reference cannot be used ("" when it can)."""
    if not isinstance(reference, dict) or reference.get("mode") not in MODES:
        return f"reference for code_output must be a dict with 'mode' in {MODES}, got {reference!r}"[:300]
    needed = ("output",) if reference["mode"] == "deduction" else ("output", "program", "entry_point")
    missing = [key for key in needed if not isinstance(reference.get(key), str)]
    return f"reference for code_output ({reference['mode']}) lacks string fields {missing}" if missing else ""
