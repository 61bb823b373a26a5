"""Sums and products with bounds: `\\sum_{k=1}^{n} k^2`, `\\prod_{k=1}^{5} k`.

The rule (issue 20, class 7): evaluate what is bounded, compare the rest by its structure.

- Integer bounds with at most `MAX_TERMS` terms, every term within the parser's size bounds: the
  value (`\\sum_{k=1}^{10} k` is 55, `\\prod_{k=1}^{5} k` is 120).
- A sum of a polynomial in the index (degree at most `MAX_DEGREE`, bounds free of the index): its
  closed form (`\\sum_{k=1}^{n} (2k-1)` is n^2), by Faulhaber's formulas -- bounded work.
- Anything else (an infinite series, a symbolic product, a term whose size cannot be bounded up
  front): the opaque `SumOf(body, lo, hi)` / `ProductOf(...)` with the index renamed to `INDEX`. It
  equals the same series written with another index letter and nothing else: a series is never
  summed to decide whether it equals a number (`\\sum 1/k^2` is not compared with `\\pi^2/6`).

Before a term is computed, every power, factorial and binomial in the body that depends on the index
is checked at both bounds (they must be linear in the index, so the bounds are their extremes).
"""

from __future__ import annotations

import math

import sympy

from verifiers.math_values import INDEX, ProductOf, SumOf

MAX_TERMS = 200
MAX_DEGREE = 10
MAX_BOUND = 10**6


class SeriesError(ValueError):
    """The bounds are not a usable `k = a` subscript and superscript."""


def series(kind: str, index: sympy.Symbol, lo: sympy.Expr, hi: sympy.Expr, body: sympy.Expr, *,
           max_digits: int, max_factorial: int, max_exponent: int) -> sympy.Expr:
    """The value of `\\sum` (`kind="sum"`) or `\\prod` over `index` from `lo` to `hi` of `body`."""
    if index in lo.free_symbols or index in hi.free_symbols:
        raise SeriesError(f"the bounds of \\{kind} depend on its index {index}")
    body = body.xreplace({index: INDEX})
    if _countable(lo, hi) and _terms_bounded(body, lo, hi, max_digits, max_factorial, max_exponent):
        terms = [body.xreplace({INDEX: sympy.Integer(n)}) for n in range(int(lo), int(hi) + 1)]
        if kind == "sum":
            return sympy.Add(*terms)
        if _product_digits(terms) <= max_digits:
            return sympy.Mul(*terms)
    elif kind == "sum" and _polynomial(body) and not (lo.has(sympy.oo) or hi.has(sympy.oo)):
        return sympy.expand(sympy.summation(body, (INDEX, lo, hi)))
    return (SumOf if kind == "sum" else ProductOf)(body, lo, hi)


def _countable(lo: sympy.Expr, hi: sympy.Expr) -> bool:
    return (lo.is_Integer and hi.is_Integer and abs(lo) <= MAX_BOUND and abs(hi) <= MAX_BOUND
            and int(hi) - int(lo) + 1 <= MAX_TERMS)


def _polynomial(body: sympy.Expr) -> bool:
    if not body.is_polynomial(INDEX):
        return False
    return sympy.degree(body, INDEX) <= MAX_DEGREE and not any(
        INDEX in c.free_symbols for c in sympy.Poly(body, INDEX).coeffs())


def _terms_bounded(body: sympy.Expr, lo: sympy.Expr, hi: sympy.Expr, max_digits: int, max_factorial: int,
                   max_exponent: int) -> bool:
    """Whether every term can be built without a power, factorial or binomial past the bounds."""
    points = [sympy.Integer(n) for n in range(int(lo), int(hi) + 1)]
    for node in sympy.preorder_traversal(body):
        if INDEX not in getattr(node, "free_symbols", ()):
            continue
        if isinstance(node, sympy.Pow):
            exps = _values(node.exp, points)
            if exps is None:
                return False
            if not node.base.is_number and INDEX not in node.base.free_symbols:  # x^k: a symbolic power
                if max(exps) > max_exponent:
                    return False
                continue
            bases = _values(node.base, points)
            if bases is None or any(e * abs(math.log10(b)) > max_digits for e, b in zip(exps, bases) if b > 0):
                return False
        elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.binomial)):
            args = [_values(a, points) for a in node.args]
            if any(v is None or max(v) > max_factorial for v in args):
                return False
    return True


def _values(e: sympy.Expr, points: list[sympy.Integer]) -> list[float] | None:
    """`|e|` at every index value when `e` is linear in the index with number coefficients, else None.

    Linear keeps every value small enough to compute (the index is at most `MAX_BOUND`).
    """
    linear = e.is_polynomial(INDEX) and sympy.degree(e, INDEX) <= 1 and not e.free_symbols - {INDEX}
    if INDEX in e.free_symbols and not linear:
        return None
    out = []
    for n in points:
        v = e.xreplace({INDEX: n})
        if not v.is_number or v.is_finite is False:
            return None
        out.append(float(abs(complex(v.evalf(15)))))
    return out


def _product_digits(terms: list[sympy.Expr]) -> float:
    digits = 0.0
    for t in terms:
        if t.is_Rational and t != 0:
            digits += math.log10(abs(t.p)) + math.log10(t.q)
        elif t.is_number and t.is_finite is not False:
            digits += max(0.0, math.log10(max(abs(complex(t.evalf(15))), 1.0)))
    return digits
