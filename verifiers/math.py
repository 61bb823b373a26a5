"""The `math` verifier: is the final answer in a response equal to the gold answer?

Why our own instead of math-verify: speed (RL checks G answers per prompt every step; cheap string
and exact rational checks come before sympy, parsing is cached, there is no antlr LaTeX parser),
safety in killable worker processes (inputs are screened before sympy, no `signal.alarm`, no
threads), and exactness where math-verify is lenient (`\\frac{1}{2^{99}}` vs `\\frac{1}{2^{98}}`
and `\\frac{1}{2004!}` vs `\\frac{1}{2006!}` are different answers here).

The pieces: `math_extract` finds the answer (strict: a marker is required; lenient: falls back to
the last math block, then the last number), `math_normalize` removes typography and screens,
`math_parse` turns the text into sympy values, `math_equiv` decides equality. This module ties
them together and adds the hedging rule: several different boxed answers, or a `\\pm`, for a
single-valued gold answer score 0.
"""

from __future__ import annotations

from typing import Any

from verifiers.base import Task, Verdict
from verifiers.math_equiv import Comparison, compare, is_single_valued, math_equal, prepare
from verifiers.math_extract import MODES, Extraction, extract_answer

__all__ = ["Comparison", "Extraction", "MathVerifier", "compare", "extract_answer", "math_equal"]


class MathVerifier:
    """Scores 1.0 when the extracted answer equals `task.reference` (a gold answer string), else 0.0.

    `score=None` (cannot judge) only when the reference itself is unusable.
    """

    name = "math"

    def __init__(self, extract: str = "strict", **options: Any) -> None:
        if extract not in MODES:
            raise ValueError(f"MathVerifier: option 'extract' must be one of {MODES}, got {extract!r}")
        if options:
            raise ValueError(f"MathVerifier: unknown options {sorted(options)}; the only option is 'extract'")
        self.extract = extract

    def verify(self, response: str, task: Task) -> Verdict:
        """Score one response; never raises on model output."""
        gold = task.reference
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)
        if not isinstance(gold, str) or not gold.strip():
            return Verdict(None, f"task {task.id}: reference must be a non-empty answer string, got {gold!r}")
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
        answer = found.answer
        hedged = len(set(found.boxed)) > 1 and is_single_valued(prepare(gold))
        if hedged and not all(math_equal(answer, other) for other in found.boxed):
            metrics["verifier/math/hedged"] = 1.0
            return Verdict(0.0, f"hedged: {len(set(found.boxed))} different boxed answers", metrics)
        result = compare(gold, answer)
        if not result.equal and prepare(gold).error is not None:
            return Verdict(None, result.reason, metrics)
        if result.reason.startswith("hedged"):
            metrics["verifier/math/hedged"] = 1.0
        return Verdict(1.0 if result.equal else 0.0, result.reason, metrics)
