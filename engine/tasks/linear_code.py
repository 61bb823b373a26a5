"""Built-in coding tasks: write `f(x) = a*x + b` from input/output examples, judged by hidden unit tests.

The task family the tiny CPU model can learn with the `unit_tests` verifier in the loop. The prompt
shows the function at x = 0, 1, ... (`f(0)=47 f(1)=52 f(2)=57\\n`) and the demonstration response is
a one-line program, `def f(x): return 5*x+47`. The `reference` is the HumanEval-style dict of
`verifiers.unit_tests` (`{"test": "def check(candidate): ...", "entry_point": "f"}`): one sandbox run
per response, passing only when `f` is right on `hidden_tests` inputs the prompt never shows (so a
program that tabulates the shown examples fails). Slopes are 1 .. `max_slope` and intercepts
0 .. `max_intercept`: the intercept is copied from f(0), and with one-digit slopes the slope is the
last digit of f(1) minus that of f(0) (mod 10), a rule small enough for a 1 M-parameter model to learn
from the training problems and apply to held-out ones.

`teacher_accuracy < 1` makes the demonstrations a flawed teacher: a seeded share of them reads the
intercept off f(1) instead of f(0) (`return 5*x+52`), a program that is wrong on every input. The
hidden tests always check the right function, so imitation learns the teacher's mix while RL with
the verifier can learn past it.

Reproducibility as in `engine.tasks.arithmetic`: training task `i` is drawn from its own generator
seeded with `(seed, i)`, so the stream position is one integer. A problem is its `(a, b)` pair (the
prompt and the hidden tests follow from it), the held-out pairs are drawn from a generator seeded only
by the knobs, and training and corpus draws that land on a held-out pair are redrawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from engine.tasks.base import SeededStream, TaskConfig
from verifiers.base import Task

ENTRY_POINT = "f"
HIDDEN_INPUTS = range(-20, 21)  # hidden test inputs are drawn from here, minus the shown ones


class LinearCodeSource(SeededStream):
    """Seeded stream of `f(x) = a*x + b` coding tasks with a fixed held-out set (see the module docstring)."""

    def __init__(
        self, max_slope: int = 9, max_intercept: int = 99, examples: int = 3, hidden_tests: int = 4,
        seed: int = 0, eval_size: int = 64, teacher_accuracy: float = 1.0,
    ) -> None:
        if max_slope < 1:
            raise ValueError(f"task.linear_code.max_slope must be >= 1, got {max_slope}")
        if max_intercept < 0:
            raise ValueError(f"task.linear_code.max_intercept must be >= 0, got {max_intercept}")
        if examples < 2:
            raise ValueError(f"task.linear_code.examples must be >= 2 (two points fix a line), got {examples}")
        hidden_room = len(HIDDEN_INPUTS) - examples
        if not 1 <= hidden_tests <= hidden_room:
            raise ValueError(f"task.linear_code.hidden_tests must be between 1 and {hidden_room} "
                             f"(inputs {HIDDEN_INPUTS.start} .. {HIDDEN_INPUTS.stop - 1} not shown), got {hidden_tests}")
        if not 0.0 <= teacher_accuracy <= 1.0:
            raise ValueError(f"task.linear_code.teacher_accuracy={teacher_accuracy}: expected a fraction in [0, 1]")
        space = max_slope * (max_intercept + 1)
        if not 0 <= eval_size <= space // 2:
            raise ValueError(f"task.eval_size={eval_size} must be between 0 and half of the {space} distinct "
                             f"problems (max_slope={max_slope}, max_intercept={max_intercept})")
        self.max_slope = max_slope
        self.max_intercept = max_intercept
        self.examples = examples
        self.hidden_tests = hidden_tests
        self.teacher_accuracy = teacher_accuracy
        self.seed = seed
        self.eval_size = eval_size
        self._eval = self._held_out()
        self._held = set(self._eval)
        self._index = 0  # SeededStream: the stream position

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> LinearCodeSource:
        c = cfg.linear_code
        return cls(c.max_slope, c.max_intercept, c.examples, c.hidden_tests, seed=seed, eval_size=cfg.eval_size,
                   teacher_accuracy=c.teacher_accuracy)

    def sample(self, n: int) -> list[Task]:
        return [self._task(f"linear_code-{self.seed}-{i}", self._train_draw(f"train:{i}"),
                           self._teacher_right(f"train:{i}"))
                for i in self._advance(n)]

    def eval_tasks(self, n: int) -> list[Task]:
        self._check_eval_size(n)
        return [self._task(f"linear_code-eval-{i}", line) for i, line in enumerate(self._eval[:n])]

    def corpus(self, n_docs: int) -> Iterator[str]:
        for i in range(n_docs):
            task = self._task("", self._train_draw(f"corpus:{i}"), self._teacher_right(f"corpus:{i}"))
            yield f"{task.prompt}{task.meta['response']}"

    def _draw(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(1, self.max_slope), rng.randint(0, self.max_intercept)

    def _train_draw(self, key: str) -> tuple[int, int]:
        rng = random.Random(f"linear_code:{self.seed}:{key}")
        while True:  # terminates: at most half of the problems are held out
            line = self._draw(rng)
            if line not in self._held:
                return line

    def _held_out(self) -> list[tuple[int, int]]:
        rng = random.Random(f"linear_code-eval:{self.max_slope}:{self.max_intercept}")
        chosen: dict[tuple[int, int], None] = {}
        while len(chosen) < self.eval_size:
            chosen.setdefault(self._draw(rng))
        return list(chosen)

    def _teacher_right(self, key: str) -> bool:
        return (self.teacher_accuracy >= 1.0
                or random.Random(f"linear_code-teacher:{self.seed}:{key}").random() < self.teacher_accuracy)

    def _task(self, task_id: str, line: tuple[int, int], teacher_right: bool = True) -> Task:
        a, b = line
        shown = range(self.examples)
        hidden = random.Random(f"linear_code-tests:{a}:{b}:{self.examples}").sample(
            [x for x in HIDDEN_INPUTS if x not in shown], self.hidden_tests)
        return Task(
            id=task_id,
            prompt=" ".join(f"{ENTRY_POINT}({x})={a * x + b}" for x in shown) + "\n",
            reference={"test": check_source([(x, a * x + b) for x in hidden]), "entry_point": ENTRY_POINT},
            verifier="unit_tests",
            meta={"response": program(a, b if teacher_right else a + b), "slope": a, "intercept": b},
        )


def program(slope: int, intercept: int) -> str:
    """The demonstration: a one-line definition of `f` (`def f(x): return 2*x+3`)."""
    return f"def {ENTRY_POINT}(x): return {slope}*x+{intercept}"


def check_source(cases: list[tuple[int, int]]) -> str:
    """A HumanEval-style `check(candidate)` asserting `candidate(x) == y` for each `(x, y)`."""
    asserts = "".join(f"    assert candidate({x}) == {y}\n" for x, y in cases)
    return f"def check(candidate):\n{asserts}"
