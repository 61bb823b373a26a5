"""Verifiers for the engine's loop tests, loaded by the verifier pool as `tests.engine.plugins:Class`.

A tiny random policy never solves arithmetic, so these reward what it does produce; the module stays
light (no torch) because the pool's process workers import it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from verifiers.base import Task, Verdict

PATH = "tests.engine.plugins"


class EvenLengthVerifier:
    """1.0 for a response with an even number of characters: about half of a random policy's samples
    earn it, so every group has mixed rewards and the policy really moves."""

    name = "even_length"

    def verify(self, response: str, task: object) -> Verdict:
        even = len(response) % 2 == 0
        return Verdict(1.0 if even else 0.0, "even" if even else "odd")


class SlowOddVerifier:
    """1.0 for every response, but one with an odd number of characters first sleeps far past the
    pool's timeout: any reward below 1 is a timeout scored 0."""

    name = "slow_odd"

    def verify(self, response: str, task: object) -> Verdict:
        if len(response) % 2:
            time.sleep(60.0)
        return Verdict(1.0, "judged")


class AlwaysRight:
    """Scores every response 1.0: held-out accuracy is 1.0 at the first evaluation."""

    name = "always_right"

    def verify(self, response: str, task: object) -> Verdict:
        return Verdict(1.0, "accepted")


class OddReferenceUnsolvable:
    """0.0 for every response to a task whose reference is odd (its group's rewards are all equal:
    uninformative), the even-length rule otherwise (mixed groups)."""

    name = "odd_reference_unsolvable"

    def verify(self, response: str, task: Task) -> Verdict:
        if int(task.reference) % 2:
            return Verdict(0.0, "unsolvable")
        return EvenLengthVerifier().verify(response, task)


def write_doubling_prompts(path: Path, count: int = 40) -> Path:
    """A task file of `What is i+i?` prompts (answer `2i`, demonstration `Answer: 2i`) at `path`."""
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?\n", "answer": str(2 * i),
                                        "response": f"Answer: {2 * i}"}) + "\n" for i in range(count)))
    return path
