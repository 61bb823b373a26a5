"""Built-in linear equations in one unknown (`Solve for x: 3*x + 4 = 19`), solved by sympy.

Four forms (knob `forms`): `one_sided` `a*x+b=c` (`-2*x + 5 = 11`), `bracket` `a*(x+b)=c`
(`3*(x - 4) = 6`), `two_sided` `a*x+b=c*x+d` (`5*x - 2 = 3*x + 8`) and `divided` `x/a+b=c`
(`x/4 + 1 = 3`). Coefficients and constants are nonzero integers with absolute value up to
`coefficient_range` (a bracket's or a divisor's `a` is at least 2 in absolute value, a divisor
positive, and a coefficient of 1 is written `x`). With `integer_solutions` the solution is drawn
from `-range .. range` (for `divided`, the solution divided by `a`) and the right-hand constant
follows from it; without, every number is drawn and the solution is a fraction in general.

The answer is what `sympy.solve` finds for the equation text the prompt shows (parsed back, not
computed from the drawn numbers), written as sympy prints a rational (`5`, `-3/7`): a reference the
`math` verifier reads, and the demonstration response is `\\boxed{-3/7}`.

Reproducibility as in `engine.tasks.arithmetic`: training task `i` is drawn from its own generator
seeded with `(seed, i)`, so the stream position is one integer; the held-out equations are drawn
from a generator seeded only by the knobs, and training and corpus draws that land on one are redrawn.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence

import sympy
from sympy.parsing.sympy_parser import parse_expr

from engine.tasks.base import EQUATION_FORMS as FORMS
from engine.tasks.base import SeededStream, TaskConfig
from verifiers.base import Task

_NEEDS_TWO = ("bracket", "divided")  # forms whose `a` is at least 2 in absolute value
_X = sympy.Symbol("x")


@functools.lru_cache(maxsize=8192)
def solve_equation(equation: str) -> str:
    """The one solution of a linear equation in `x` (`"3*x + 4 = 19"` -> `"5"`), as sympy prints it."""
    left, right = equation.split("=")
    local = {"x": _X}
    difference = parse_expr(left, local_dict=local) - parse_expr(right, local_dict=local)
    # Linear with no x in a denominator: sympy's direct solver, without its simplify and check passes (5x faster).
    solutions = sympy.solve(difference, _X, manual=True, simplify=False, check=False)
    if len(solutions) != 1:
        raise ValueError(f"{equation!r} has {len(solutions)} solutions, expected exactly one")
    return str(solutions[0])


def form_space(form: str, coefficient_range: int) -> int:
    """How many distinct equations of `form` the knobs allow (each draw of its numbers is a different text)."""
    r = coefficient_range
    nonzero, free = 2 * r, 2 * r + 1  # nonzero values in -r..r, all values in -r..r
    return {
        "one_sided": nonzero * nonzero * free,
        "bracket": 2 * (r - 1) * nonzero * free,
        "two_sided": nonzero * (nonzero - 1) * nonzero * free,
        "divided": (r - 1) * nonzero * free,
    }[form]


class LinearEquationsSource(SeededStream):
    """Seeded stream of linear equations with a fixed held-out set (see the module docstring)."""

    def __init__(
        self, coefficient_range: int = 9, forms: Sequence[str] = FORMS, integer_solutions: bool = True,
        seed: int = 0, eval_size: int = 64,
    ) -> None:
        if coefficient_range < 1:
            raise ValueError(f"task.linear_equations.coefficient_range must be >= 1, got {coefficient_range}")
        unknown = sorted(set(forms) - set(FORMS))
        if not forms or unknown:
            raise ValueError(f"task.linear_equations.forms={list(forms)!r}: expected a non-empty subset of {list(FORMS)}")
        small = [f for f in forms if f in _NEEDS_TWO and coefficient_range < 2]
        if small:
            raise ValueError(f"task.linear_equations.forms includes {small}, which need coefficient_range >= 2 "
                             f"(got {coefficient_range})")
        self.coefficient_range = coefficient_range
        self.forms = tuple(f for f in FORMS if f in forms)
        self.integer_solutions = integer_solutions
        self.seed = seed
        self.eval_size = eval_size
        space = sum(form_space(f, coefficient_range) for f in self.forms)
        if not 0 <= eval_size <= space // 2:
            raise ValueError(f"task.eval_size={eval_size} must be between 0 and half of the {space} distinct "
                             f"equations (coefficient_range={coefficient_range}, forms={list(self.forms)})")
        self._eval = self._held_out()
        self._held = set(self._eval)
        self._index = 0  # SeededStream: the stream position

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> LinearEquationsSource:
        c = cfg.linear_equations
        return cls(c.coefficient_range, list(c.forms), c.integer_solutions, seed=seed, eval_size=cfg.eval_size)

    def sample(self, n: int) -> list[Task]:
        indices = self._advance(n)
        return [self._task(f"linear_equations-{self.seed}-{i}", self._train_draw(f"train:{i}"))
                for i in indices]

    def eval_tasks(self, n: int) -> list[Task]:
        self._check_eval_size(n)
        return [self._task(f"linear_equations-eval-{i}", eq) for i, eq in enumerate(self._eval[:n])]

    def corpus(self, n_docs: int) -> Iterator[str]:
        for i in range(n_docs):
            task = self._task("", self._train_draw(f"corpus:{i}"))
            yield f"{task.prompt}{task.meta['response']}"

    def _draw(self, rng: random.Random) -> str:
        """One equation's text, e.g. `3*(x - 4) = 6`."""
        r = self.coefficient_range
        form = rng.choice(self.forms)
        nonzero = [v for v in range(-r, r + 1) if v]
        a = rng.choice([v for v in nonzero if abs(v) >= 2] if form == "bracket" else
                       range(2, r + 1) if form == "divided" else nonzero)
        b = rng.choice(nonzero)
        c = rng.choice([v for v in nonzero if v != a]) if form == "two_sided" else 0
        free = rng.randint(-r, r)  # the solution (integer_solutions) or the right-hand constant
        if form == "one_sided":
            rhs = a * free + b if self.integer_solutions else free
            return f"{_times_x(a)}{_plus(b)} = {rhs}"
        if form == "bracket":
            rhs = a * (free + b) if self.integer_solutions else free
            return f"{a}*(x{_plus(b)}) = {rhs}"
        if form == "two_sided":
            d = (a - c) * free + b if self.integer_solutions else free
            return f"{_times_x(a)}{_plus(b)} = {_times_x(c)}{_plus(d) if d else ''}"
        rhs = free + b if self.integer_solutions else free  # divided: the solution is a*free
        return f"x/{a}{_plus(b)} = {rhs}"

    def _train_draw(self, key: str) -> str:
        rng = random.Random(f"linear_equations:{self.seed}:{key}")
        while True:  # terminates: at most half of the equations are held out
            equation = self._draw(rng)
            if equation not in self._held:
                return equation

    def _held_out(self) -> list[str]:
        rng = random.Random(f"linear_equations-eval:{self.coefficient_range}:{self.forms}:{self.integer_solutions}")
        chosen: dict[str, None] = {}
        while len(chosen) < self.eval_size:
            chosen.setdefault(self._draw(rng))
        return list(chosen)

    def _task(self, task_id: str, equation: str) -> Task:
        answer = solve_equation(equation)
        return Task(
            id=task_id,
            prompt=f"Solve for x: {equation}\n",
            reference=answer,
            verifier="math",
            meta={"response": f"\\boxed{{{answer}}}", "equation": equation},
        )


def _times_x(coefficient: int) -> str:
    return {1: "x", -1: "-x"}.get(coefficient, f"{coefficient}*x")


def _plus(constant: int) -> str:
    return f" + {constant}" if constant >= 0 else f" - {-constant}"
