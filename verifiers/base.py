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


@dataclass(frozen=True)
class Verdict:
    """The score of one response. `score=None` means the verifier cannot judge: the sample is dropped."""

    score: float | None
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Verifier(Protocol):
    """Anything with a `name` and a `verify` that never raises on model output."""

    name: str

    def verify(self, response: str, task: Task) -> Verdict: ...
