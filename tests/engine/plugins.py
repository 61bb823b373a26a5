"""Verifiers for the engine's loop tests, loaded by the verifier pool as `tests.engine.plugins:Class`.

A tiny random policy never solves arithmetic, so these reward what it does produce; the module stays
light (no torch) because the pool's process workers import it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollout.types import Response
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
    pool's timeout: a `timeout` infra error, left out of the rewards."""

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


def _raise(message: str) -> Verdict:
    raise RuntimeError(message)


def _print_then_judge(response: str, task: Task) -> Verdict:
    print("x" * 100_000 + " PRINTED-BY-THE-VERIFIER", flush=True)
    return EvenLengthVerifier().verify(response, task)


# task.reference -> what MisbehavingVerifier does with a response to that task
MISBEHAVIOURS: dict[str, Callable[[str, Task], Verdict]] = {
    "raise": lambda response, task: _raise("the verifier broke"),
    "hang": lambda response, task: SlowOddVerifier().verify("odd", task),  # sleeps 60 s
    "crash": lambda response, task: os._exit(13),
    "nan": lambda response, task: Verdict(float("nan"), "not a number"),
    "five": lambda response, task: Verdict(5.0, "five out of one"),
    "print": _print_then_judge,
    "ok": lambda response, task: EvenLengthVerifier().verify(response, task),
}


class MisbehavingVerifier:
    """Fails as its task's reference says (a key of MISBEHAVIOURS), so one RL step meets every kind of
    verifier failure; on the second pass over the task file (task ids `row@1`) every call raises."""

    name = "misbehaving"

    def verify(self, response: str, task: Task) -> Verdict:
        if task.id.endswith("@1"):
            _raise("broken on the second epoch")
        return MISBEHAVIOURS[task.reference](response, task)


def write_doubling_prompts(path: Path, count: int = 40) -> Path:
    """A task file of `What is i+i?` prompts (answer `2i`, demonstration `Answer: 2i`) at `path`."""
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?\n", "answer": str(2 * i),
                                        "response": f"Answer: {2 * i}"}) + "\n" for i in range(count)))
    return path


class FirstTaskCollector:
    """A collector loaded as `rl.collector=tests.engine.plugins:FirstTaskCollector`: each step, one group of
    G copies of the step's first task's answer, each rewarded 1.0; its state is how many steps it collected,
    and `finish` writes that count to `<run>/first_task.txt`."""

    def __init__(self, ctx: Any) -> None:
        self.ctx, self.collected = ctx, 0

    def collect(self, step: int) -> tuple[list[Response], Any, dict[str, float]]:
        import torch  # here: the pool's process workers import this module

        n, task = self.ctx.cfg.rollout.n, self.ctx.source.sample(1)[0]
        responses = [Response(task.id, [1], [2], [-0.5], str(task.reference), "stop", step) for _ in range(n)]
        self.collected += 1
        return responses, torch.ones(1, n), {"test/collected": float(self.collected)}

    def state_dict(self) -> dict[str, Any]:
        return {"collected": self.collected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.collected = state["collected"]

    def finish(self, run_dir: Path) -> None:
        (run_dir / "first_task.txt").write_text(str(self.collected))


class NotACollector:
    """Has `collect` but none of the state methods: refused when loaded as a collector."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def collect(self, step: int) -> None:
        return None
