"""Built-in arithmetic problems: the task source of the embedded CPU default.

Integer expressions like `12+7` or `3+4*5` with difficulty knobs (digits per operand, operand count,
operators among `+-*`, usual precedence). The prompt is `What is 12+7?\n` and the demonstration
response `Answer: 19` (`answer_format=answer`: a final `Answer: ...` line is what the `math` verifier
extracts in strict mode), `\\boxed{19}` (`boxed`) or `\\boxed{91}` (`reversed`: for addition, the sum
zero-padded to the widest possible sum and written least-significant digit first, the order in which
carries are computed, so a small transformer learns it far faster; Lee et al. 2023). All stay a
handful of tokens so the tiny model (256 positions) has room.

`teacher_accuracy < 1` makes the demonstrations a flawed teacher: a seeded share of them drops every
carry (`47+85` -> `22`). The task's `reference` is always the right answer, so imitation learns the
teacher's mistakes while a verifier-driven stage (RL) can learn past them.

Reproducibility without carried RNG state: training task `i` is drawn from its own generator seeded
with `(seed, i)`, so the stream position is one integer and resuming is exact. The held-out set is
drawn from a generator seeded only by the difficulty knobs (runs with different seeds evaluate on the
same problems), and training and corpus draws that land on a held-out expression are redrawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from engine.tasks.base import SeededStream, TaskConfig, check_answer_knobs
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


class ArithmeticSource(SeededStream):
    """Seeded stream of arithmetic tasks with a fixed held-out set (see the module docstring)."""

    def __init__(
        self, digits: int = 1, operands: int = 2, operators: str = "+-", seed: int = 0, eval_size: int = 64,
        answer_format: str = "answer", teacher_accuracy: float = 1.0,
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
        check_answer_knobs(operators, answer_format, teacher_accuracy)
        self.answer_format = answer_format
        self.teacher_accuracy = teacher_accuracy
        self.width = len(str(operands * (10**digits - 1)))  # digits of the largest possible sum
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
        self._index = 0  # SeededStream: the stream position

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> ArithmeticSource:
        a = cfg.arithmetic
        return cls(a.digits, a.operands, a.operators, seed=seed, eval_size=cfg.eval_size,
                   answer_format=a.answer_format, teacher_accuracy=a.teacher_accuracy)

    def sample(self, n: int) -> list[Task]:
        indices = self._advance(n)
        return [
            self._task(f"arithmetic-{self.seed}-{i}", self._train_draw(f"train:{i}"), self._teacher_right(f"train:{i}"))
            for i in indices
        ]

    def eval_tasks(self, n: int) -> list[Task]:
        self._check_eval_size(n)
        return [self._task(f"arithmetic-eval-{i}", expr) for i, expr in enumerate(self._eval[:n])]

    def corpus(self, n_docs: int) -> Iterator[str]:
        for i in range(n_docs):
            task = self._task("", self._train_draw(f"corpus:{i}"), self._teacher_right(f"corpus:{i}"))
            yield f"{task.prompt}{task.meta['response']}"

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

    def _teacher_right(self, key: str) -> bool:
        return self.teacher_accuracy >= 1.0 or random.Random(f"teacher:{self.seed}:{key}").random() < self.teacher_accuracy

    def _task(self, task_id: str, expression: str, teacher_right: bool = True) -> Task:
        answer = self.written(evaluate(expression))
        shown = answer if teacher_right else self.written(carry_free_sum(expression))
        return Task(
            id=task_id,
            prompt=f"What is {expression}?\n",
            reference=answer,
            verifier="math",
            meta={"response": ANSWER_TEMPLATES[self.answer_format].format(shown), "expression": expression},
        )

    def written(self, value: int) -> str:
        """`value` as this source writes answers (reversed and zero-padded for `answer_format=reversed`)."""
        return str(value).zfill(self.width)[::-1] if self.answer_format == "reversed" else str(value)


# answer_format -> the demonstration's text around the written answer.
ANSWER_TEMPLATES = {"answer": "Answer: {}", "boxed": "\\boxed{{{}}}", "reversed": "\\boxed{{{}}}"}


def carry_free_sum(expression: str) -> int:
    """The sum of a `+`-only expression with every carry dropped: each digit is the column sum mod 10."""
    operands = [int(x) for x in expression.split("+")]
    total, place = 0, 1
    while any(operands):
        total += sum(x % 10 for x in operands) % 10 * place
        operands, place = [x // 10 for x in operands], place * 10
    return total
