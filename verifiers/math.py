"""The `math` verifier: is the final answer in a response equal to the gold answer?

Why our own instead of math-verify: speed (RL checks G answers per prompt every step; cheap string
and exact rational checks come before sympy, parsing is cached, there is no antlr LaTeX parser),
safety in killable worker processes (inputs are screened before sympy, no `signal.alarm`, no
threads), and exactness where math-verify is lenient (`\\frac{1}{2^{99}}` vs `\\frac{1}{2^{98}}`
and `\\frac{1}{2004!}` vs `\\frac{1}{2006!}` are different answers here).

The pieces: `math_extract` finds the answer (strict: a marker is required; lenient: falls back to
the last math block, then the last number), `math_normalize` removes typography and screens,
`math_parse` turns the text into sympy values, `math_equiv` decides equality. This module ties
them together and adds two rules about several answers: several different boxed answers, or a
`\\pm`, for a single-valued gold answer are a hedge and score 0; for a gold of several values they
are one answer, the list of the boxes in order (`\\boxed{1}, \\boxed{2}` is `1, 2`).

The reference goes through the same extraction when it is a solution rather than an answer (MATH
and NuminaMath store a worked solution ending in `\\boxed{...}`): `reference="auto"` (the default)
extracts when a marker is present (a box, an `Answer:` line) and takes the reference whole otherwise;
`whole` never extracts; `extract` requires a marker. Backslashes doubled by a JSON export
(`\\\\boxed`) are made single first, and several different boxes in a reference are its values, in
order. A reference that still cannot be parsed is a `bad_reference` verdict (score None, counted by
kind); `check_reference` finds it before training (`task=file` checks every row at load).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from verifiers.base import Task, Verdict
from verifiers.math_equiv import Comparison, compare, is_single_valued, math_equal, prepare, usable_reference
from verifiers.math_extract import (
    MODES,
    Extraction,
    extract_answer,
    undouble_backslashes,
    undouble_if_all_doubled,
)

__all__ = ["Comparison", "Extraction", "MathVerifier", "compare", "extract_answer", "math_equal"]

REFERENCE_MODES = ("auto", "whole", "extract")


class MathVerifier:
    """Scores 1.0 when the extracted answer equals the gold answer of `task.reference`, else 0.0.

    `score=None` (cannot judge) only when the reference itself is unusable (`bad_reference`).
    """

    name = "math"

    def __init__(self, extract: str = "strict", reference: str = "auto", **options: Any) -> None:
        if extract not in MODES:
            raise ValueError(f"MathVerifier: option 'extract' must be one of {MODES}, got {extract!r}")
        if reference not in REFERENCE_MODES:
            raise ValueError(f"MathVerifier: option 'reference' must be one of {REFERENCE_MODES}, got {reference!r}")
        if options:
            raise ValueError(f"MathVerifier: unknown options {sorted(options)}; the options are 'extract' and "
                             "'reference'")
        self.extract = extract
        self.reference = reference

    def gold_answer(self, reference: Any) -> tuple[str | None, str]:
        """(the gold answer in `reference`, or None; why not). See the module docstring."""
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            reference = str(reference)
        if not isinstance(reference, str) or not reference.strip():
            return None, f"reference must be a non-empty answer string, got {reference!r:.80}"
        return _gold_answer(reference, self.reference)

    def check_reference(self, reference: Any) -> str | None:
        """Why `reference` cannot be judged against (it is not an answer this verifier can parse), or
        None when it can."""
        gold, why = self.gold_answer(reference)
        if gold is None:
            return why
        error = usable_reference(gold)
        return None if error is None else f"the reference {gold!r:.80} cannot be parsed: {error}"

    def verify(self, response: str, task: Task) -> Verdict:
        """Score one response; never raises on model output."""
        gold, why = self.gold_answer(task.reference)
        if gold is None:
            return _bad_reference(f"task {task.id}: {why}")
        if not isinstance(response, str):
            return Verdict(0.0, f"response is a {type(response).__name__}, not text", {"verifier/math/extracted": 0.0})
        try:
            return self._verify(response, gold)
        except Exception as exc:  # noqa: BLE001 - a verifier must not crash a worker on model output
            return Verdict(0.0, f"verifier error: {type(exc).__name__}: {exc}"[:300], {"verifier/math/error": 1.0})

    def _verify(self, response: str, gold: str) -> Verdict:
        found = extract_answer(response, self.extract)
        if found.answer is None:
            return Verdict(0.0, found.reason, {"verifier/math/extracted": 0.0})
        metrics = {"verifier/math/extracted": 1.0, "verifier/math/hedged": 0.0}
        answer = undouble_if_all_doubled(found.answer)
        values = list(dict.fromkeys(found.boxed))
        if len(values) > 1 and is_single_valued(prepare(gold)):
            if not all(math_equal(answer, other) for other in values):
                metrics["verifier/math/hedged"] = 1.0
                return Verdict(0.0, f"hedged: {len(values)} different boxed answers", metrics)
        elif len(values) > 1 and found.source == "boxed":  # a gold of several values: the boxes are one
            answer = ", ".join(values)  # answer, their list in order
        result = compare(gold, answer)
        if not result.equal and usable_reference(gold) is not None:
            return _bad_reference(result.reason, metrics)
        if result.reason.startswith("hedged"):
            metrics["verifier/math/hedged"] = 1.0
        return Verdict(1.0 if result.equal else 0.0, result.reason, metrics)


@lru_cache(maxsize=4096)
def _gold_answer(reference: str, mode: str) -> tuple[str | None, str]:
    """`MathVerifier.gold_answer` for a reference string (cached: G responses share one reference)."""
    text = undouble_backslashes(reference).strip()
    if mode == "whole":
        return text, ""
    found = extract_answer(text, "strict")
    if found.answer is None:
        if mode == "extract":
            return None, f"no answer marker (\\boxed{{}} or an Answer: line) in the reference {text!r:.80}"
        return text, ""
    values = list(dict.fromkeys(found.boxed))  # several different boxes: the gold's values, in order
    if found.source == "boxed" and len(values) > 1:
        return ", ".join(values), ""
    return found.answer, ""


def _bad_reference(reason: str, metrics: dict[str, float] | None = None) -> Verdict:
    """The verdict of a response whose task's reference cannot be judged against."""
    return Verdict(None, reason, {**(metrics or {}), "verifier/math/bad_reference": 1.0}, "infra_error",
                   "bad_reference")
