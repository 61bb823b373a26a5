"""The shared vocabulary of verification: `Task`, `Verdict` and the `Verifier` protocol.

`Task` lives here, in the lowest layer, because verifiers must read tasks without importing the
engine (verifiers import only stdlib, sympy and grpcio). The engine re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Task:
    """One problem to solve.

    `prompt` is plain text or a list of chat messages (`{"role": ..., "content": ...}`);
    `reference` is the gold answer (a string for `math`) or the unit tests (a dict for `unit_tests`);
    `verifier` is the registry name (or `module:Class`) of the verifier that scores answers.
    """

    id: str
    prompt: str | list[dict[str, str]]
    reference: Any
    verifier: str
    meta: dict[str, Any] = field(default_factory=dict)


# What a verdict says happened. `pass` and `fail`: the response was judged (malformed output, a wrong
# answer, a candidate program that loops past its own limit are all `fail`). `infra_error`: the
# verifier itself could not judge; such a verdict has no score and never trains as a 0.
OUTCOMES = ("pass", "fail", "infra_error")

# `Verdict.error` of an infra error: what failed. The pool sets every kind but `unjudged`.
INFRA_ERRORS = {
    "error": "verify raised, or returned something that is not a Verdict",
    "build": "building the verifier failed (an import error, a bad constructor option)",
    "timeout": "verify ran past the pool's timeout_s: its worker was killed and replaced",
    "crash": "the worker process died mid-verification and was replaced",
    "lost": "the item's worker was lost without a verdict",
    "invalid_score": "a score that is not a finite number inside the verifier's score_range",
    "unjudged": "the verifier returned score None itself (a sandbox that could not start, ...)",
    "bad_reference": "the task's reference is not an answer the verifier can read (a data error: a task file "
                     "with one is refused at load, see `Verifier.check_reference`)",
}

DEFAULT_SCORE_RANGE = (0.0, 1.0)
"""A verifier's scores lie in `score_range` (a class attribute it may declare), by default [0, 1]."""


def judged_outcome(score: float, score_range: tuple[float, float] = DEFAULT_SCORE_RANGE) -> str:
    """`pass` for a score at the top of the range (full credit), else `fail`: a partial score such as
    2 of 3 unit tests is a `fail` whose score still carries the partial credit."""
    return "pass" if score >= score_range[1] else "fail"


@dataclass(frozen=True)
class Verdict:
    """The score of one response, and its `outcome` (one of OUTCOMES).

    `score=None` is exactly `outcome="infra_error"`: the verifier could not judge, the sample is left
    out of the loss and of the group statistics, and the engine counts it. Left empty, `outcome` is
    derived from the score with the default range (`judged_outcome`); the pool re-derives it with the
    verifier's declared `score_range`. `error` is the kind of infra error (a key of INFRA_ERRORS),
    empty for a judged verdict.
    """

    score: float | None
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    outcome: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        outcome = self.outcome
        if not outcome:
            outcome = "infra_error" if self.score is None else judged_outcome(self.score)
            object.__setattr__(self, "outcome", outcome)
        if outcome not in OUTCOMES:
            raise ValueError(f"Verdict.outcome must be one of {OUTCOMES}, got {outcome!r}")
        if (self.score is None) != (outcome == "infra_error"):
            raise ValueError(f"Verdict: score {self.score!r} with outcome {outcome!r} (None is exactly infra_error)")
        if outcome == "infra_error" and not self.error:
            object.__setattr__(self, "error", "unjudged")
        if self.error not in INFRA_ERRORS and self.error:
            raise ValueError(f"Verdict.error must be one of {tuple(INFRA_ERRORS)}, got {self.error!r}")
        if self.error and outcome != "infra_error":
            raise ValueError(f"Verdict: error {self.error!r} on a judged verdict (outcome {outcome!r})")


def infra_error(error: str, reason: str) -> Verdict:
    """The verdict of an item the verifier could not judge because of `error` (a key of INFRA_ERRORS)."""
    return Verdict(None, reason, {}, "infra_error", error)


@runtime_checkable
class Verifier(Protocol):
    """Anything with a `name` and a `verify` that never raises on model output.

    A verifier may declare `score_range = (lo, hi)` (default DEFAULT_SCORE_RANGE): the pool turns a
    score outside it, or a non-finite one, into an `invalid_score` infra error. It may also define
    `check_reference(reference) -> str | None` (why a task's reference is unusable, None when it is
    fine): a task file is then checked row by row when its source is built, so a bad reference stops
    the run before training instead of dropping samples mid-run (`bad_reference` verdicts).
    """

    name: str

    def verify(self, response: str, task: Task) -> Verdict: ...
