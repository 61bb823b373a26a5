"""`ReasoningGymVerifier` (`reasoning_gym`): a reasoning-gym dataset's own `score_answer` as a verifier.

Needs the optional extra (`pip install 'assay[reasoning-gym]'`); the package is imported when the
verifier is built, so this module imports without it. `task.reference` is what
`engine.tasks.reasoning_gym_source` writes: `{"dataset": name, "options": {...}, "entry": {...}}`.
The answer is the last `<answer>...</answer>` of the response (reasoning-gym's own extraction) and
the score is whatever the dataset's scorer returns, clipped to [0, 1]. Several scorers give partial
credit (the default one gives `len(gold) / len(answer)` when the gold answer is inside a longer
answer), and some are generous: reasoning-gym 0.1.25's `spell_backward` gives 1.0000000000000002 to
a wrong answer whose first letters all match (a float sum misses its `== 1.0` penalty check).
Scorers are built once per (dataset, options) and reused.
"""

from __future__ import annotations

import json
from typing import Any

from verifiers.base import Task, Verdict


class ReasoningGymVerifier:
    """Scores the `<answer>` of a response with the task's reasoning-gym dataset scorer."""

    name = "reasoning_gym"

    def __init__(self) -> None:
        try:
            import reasoning_gym
            from reasoning_gym.utils import extract_answer
        except ImportError as err:
            raise ImportError(f"the reasoning_gym verifier needs: pip install 'assay[reasoning-gym]' ({err})") from None
        self._create = reasoning_gym.create_dataset
        self._extract = extract_answer
        self._datasets: dict[str, Any] = {}

    def verify(self, response: str, task: Task) -> Verdict:
        """The scorer's score; `None` when the reference is unusable. Never raises on model output."""
        reference = task.reference
        if not (isinstance(reference, dict) and isinstance(reference.get("dataset"), str)
                and isinstance(reference.get("entry"), dict)):
            return Verdict(None, f"task {task.id}: reference for reasoning_gym must be a dict with 'dataset' and 'entry'")
        try:
            dataset = self._dataset(reference["dataset"], reference.get("options") or {})
        except Exception as exc:  # noqa: BLE001 - an unknown dataset or bad options: the task's fault
            return Verdict(None, f"task {task.id}: cannot build {reference['dataset']!r}: {exc}"[:300])
        answer = self._extract(response) if isinstance(response, str) else None
        if answer is None:
            return Verdict(0.0, "no <answer>...</answer>", {"verifier/reasoning_gym/extracted": 0.0})
        try:
            score = min(max(float(dataset.score_answer(answer, reference["entry"])), 0.0), 1.0)
        except Exception as exc:  # noqa: BLE001 - a scorer must not crash a worker on model output
            return Verdict(0.0, f"scorer error: {type(exc).__name__}: {exc}"[:300], {"verifier/reasoning_gym/extracted": 1.0})
        return Verdict(score, f"{reference['dataset']} score {score:.3g}", {"verifier/reasoning_gym/extracted": 1.0})

    def _dataset(self, name: str, options: dict[str, Any]) -> Any:
        key = json.dumps([name, options], sort_keys=True, default=str)
        if key not in self._datasets:
            self._datasets[key] = self._create(name, **{**options, "seed": 0})
        return self._datasets[key]
