"""Built-in arithmetic problems: the task source of the embedded CPU default.

Integer expressions like `12+7` or `3+4*5` with difficulty knobs (digits per operand, operand count,
operators among `+-*`, usual precedence). The prompt is `What is 12+7?\n` and the demonstration
response `Answer: 19`: a final `Answer: ...` line is what the `math` verifier extracts in strict mode,
and both stay a handful of tokens so the tiny model (256 positions) has room.

Reproducibility without carried RNG state: training task `i` is drawn from its own generator seeded
with `(seed, i)`, so the stream position is one integer and resuming is exact. The held-out set is
drawn from a generator seeded only by the difficulty knobs (runs with different seeds evaluate on the
same problems), and training and corpus draws that land on a held-out expression are redrawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from engine.tasks.base import TaskConfig
from verifiers.base import Task

OPERATORS = "+-*"


def evaluate(expression: str) -> int:
    """Value of an expression of non-negative integers and `+-*` with the usual precedence."""
    total, term, sign, number = 0, 1, 1, ""
    for ch in expression + "+":  # the sentinel "+" closes the last term
        if ch.isdigit():
            number += ch
            continue
        if ch not in OPERATORS or not number:
            raise ValueError(f"not an arithmetic expression: {expression!r}")
        term, number = term * int(number), ""
        if ch != "*":  # a term ends: add it, start the next one with its sign
            total, term, sign = total + sign * term, 1, (1 if ch == "+" else -1)
    return total


class ArithmeticSource:
    """Seeded stream of arithmetic tasks with a fixed held-out set (see the module docstring)."""

    def __init__(
        self, digits: int = 1, operands: int = 2, operators: str = "+-", seed: int = 0, eval_size: int = 64
    ) -> None:
        if digits < 1:
            raise ValueError(f"task.arithmetic.digits must be >= 1, got {digits}")
        if operands < 2:
            raise ValueError(f"task.arithmetic.operands must be >= 2, got {operands}")
        unknown = sorted(set(operators) - set(OPERATORS))
        if not operators or unknown:
            raise ValueError(
                f"task.arithmetic.operators={operators!r}: expected a non-empty subset of {OPERATORS!r}"
            )
        self.digits = digits
        self.operands = operands
        self.operators = "".join(op for op in OPERATORS if op in operators)
        self.seed = seed
        self.eval_size = eval_size
        space = (10**digits) ** operands * len(self.operators) ** (operands - 1)
        if not 0 <= eval_size <= space // 2:
            raise ValueError(
                f"task.eval_size={eval_size} must be between 0 and half of the {space} distinct problems "
                f"(digits={digits}, operands={operands}, operators={self.operators!r})"
            )
        self._eval = self._held_out()
        self._held = set(self._eval)
        self._index = 0

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> ArithmeticSource:
        a = cfg.arithmetic
        return cls(a.digits, a.operands, a.operators, seed=seed, eval_size=cfg.eval_size)

    def sample(self, n: int) -> list[Task]:
        start, self._index = self._index, self._index + n
        return [
            self._task(f"arithmetic-{self.seed}-{i}", self._train_draw(f"train:{i}"))
            for i in range(start, start + n)
        ]

    def eval_tasks(self, n: int) -> list[Task]:
        if n > self.eval_size:
            raise ValueError(f"asked for {n} held-out tasks but task.eval_size is {self.eval_size}")
        return [self._task(f"arithmetic-eval-{i}", expr) for i, expr in enumerate(self._eval[:n])]

    def corpus(self, n_docs: int) -> Iterator[str]:
        for i in range(n_docs):
            task = self._task("", self._train_draw(f"corpus:{i}"))
            yield f"{task.prompt}{task.meta['response']}"

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"state is of a stream with seed {state['seed']}, this source has seed {self.seed}"
            )
        self._index = int(state["index"])

    def _draw(self, rng: random.Random) -> str:
        parts = [str(rng.randrange(10**self.digits))]
        for _ in range(self.operands - 1):
            parts += [rng.choice(self.operators), str(rng.randrange(10**self.digits))]
        return "".join(parts)

    def _train_draw(self, key: str) -> str:
        rng = random.Random(f"arithmetic:{self.seed}:{key}")
        while True:  # terminates: at most half of the problems are held out
            expr = self._draw(rng)
            if expr not in self._held:
                return expr

    def _held_out(self) -> list[str]:
        rng = random.Random(f"arithmetic-eval:{self.digits}:{self.operands}:{self.operators}")
        chosen: dict[str, None] = {}
        while len(chosen) < self.eval_size:
            chosen.setdefault(self._draw(rng))
        return list(chosen)

    def _task(self, task_id: str, expression: str) -> Task:
        value = evaluate(expression)
        return Task(
            id=task_id,
            prompt=f"What is {expression}?\n",
            reference=str(value),
            verifier="math",
            meta={"response": f"Answer: {value}", "expression": expression},
        )
