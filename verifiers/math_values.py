"""The values the math parser produces: sympy expressions plus a few frozen structures.

Why a module of its own: `math_parse` builds these and `math_equiv` compares them; keeping the
vocabulary apart keeps both files readable. A value is a sympy expression, or one of the
structures below whose items are values again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import sympy

PM = sympy.Symbol("PM__")
"""Stands for the sign of `\\pm`: `a \\pm b` parses as `a + PM*b`."""


BigPow = sympy.Function("BigPow")
"""An unevaluated `base ** exp`, too large to compute: compared only structurally."""


@dataclass(frozen=True)
class Rel:
    """A chain of relations: `exprs[0] ops[0] exprs[1] ops[1] ...`; ops in `= != < > <= >=`."""

    exprs: tuple[sympy.Expr, ...]
    ops: tuple[str, ...]


@dataclass(frozen=True)
class Seq:
    """A bracketed list of two or more items: a tuple `(a, b)` or an interval `[a, b)`."""

    open: str
    items: tuple[object, ...]
    close: str


@dataclass(frozen=True)
class SetOf:
    """A set written with braces: `\\{1, 2\\}`."""

    items: tuple[object, ...]


@dataclass(frozen=True)
class Bare:
    """A top-level comma list without brackets: `1, 2` (compared as a set)."""

    items: tuple[object, ...]


@dataclass(frozen=True)
class SetUnion:
    """Intervals or sets joined by `\\cup`."""

    parts: tuple[object, ...]


@dataclass(frozen=True)
class Matrix:
    """A `pmatrix` / `bmatrix` / `matrix` environment, row by row."""

    rows: tuple[tuple[object, ...], ...]


Value: TypeAlias = "sympy.Expr | Rel | Seq | SetOf | Bare | SetUnion | Matrix"


@dataclass(frozen=True)
class Parsed:
    """The parsed value and whether a decimal literal appeared (which allows a tolerance)."""

    value: Value
    has_decimal: bool


INDEX = sympy.Symbol("IDX__")
"""The index of a `\\sum` / `\\prod` kept unevaluated, renamed so `k` and `i` compare alike."""

SumOf = sympy.Function("SumOf")
"""An unevaluated `\\sum_{INDEX=lo}^{hi} body` as `SumOf(body, lo, hi)`: compared only structurally."""

ProductOf = sympy.Function("ProductOf")
"""An unevaluated `\\prod_{INDEX=lo}^{hi} body` as `ProductOf(body, lo, hi)`."""
