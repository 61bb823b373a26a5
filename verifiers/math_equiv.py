"""Deciding whether a model's answer equals the gold answer: `math_equal` and `compare`.

Why this order: RL training checks tens of thousands of answers per step, most of them decided by
a normalised string match or an exact rational comparison. Anything costlier runs only when the
cheap checks did not decide, and `sympy.simplify` only when random-point evaluation could not
(the points were all outside the expressions' domain).

Rules (see `math_normalize` for the string rules and the percent policy):
- integers and fractions compare exactly (`\\frac{1}{2^{99}}` is not `\\frac{1}{2^{98}}`); a relative
  tolerance of `REL_TOL` applies only when either side contains a decimal literal — never an
  absolute tolerance, never rounding both sides to a few digits;
- exact constants (`\\sqrt{8}` vs `2\\sqrt2`) compare at 50 significant digits: equal when they agree
  to `EXACT_REL_TOL`; expressions with variables compare at four seeded random rational points,
  one in each of (0.1, 1), (1, 3), (3, 10), (-3, -0.1) (exact arithmetic for rational functions,
  50-digit floats elsewhere), and equal needs at least two usable points; `simplify(a - b) == 0`
  (on small expressions only) decides when fewer were usable. Where the spec says "simplify backed by
  random points" we invert the order for speed: the points decide, simplify is the fallback;
- values too large to evaluate (power towers, roots of huge numbers) compare structurally:
  `10^{10^{10}}` equals `10^{10000000000}` but not `10^{10^{11}}`;
- tuples `(a, b)` compare in order, sets `\\{a, b\\}` and bare lists `a, b` as sets, intervals with
  their open/closed ends (a union of intervals as a set of reals), matrices by shape and entries;
- an equation compares with an equation when one side minus the other is a nonzero constant
  multiple (`y = 2x + 1` equals `2x - y + 1 = 0`); a gold `3` accepts `x = 3` and a gold `x = 3`
  accepts `3` (the lone symbol on the left is read as a label);
- a gold inequality in one variable accepts the same set written as an interval (`x > 2` accepts
  `(2, \\infty)`); a gold interval does NOT accept an inequality (the question asked for interval
  notation);
- `\\pm` expands to both signs when the gold has it; for a gold without it, it is hedging (False);
- a bare list read against a tuple is read in order (`3, -1` for `(3, -1)`); a matrix answer must be
  a matrix (`(1, 2)` is not `\\begin{pmatrix}1\\\\2\\end{pmatrix}`);
- labels are dropped, in order, on either side when a comparison fails otherwise: a left-hand side
  that is a name -- a variable (`x`, `x_1`, `k'`), a tuple of variables (`(p,q)`), a segment (`AB`,
  `|AB|`, `\\overline{AB}`), a function value (`f(x)`, `f(2)`), a ratio of names (`V_1:V_2`) --
  before ONE `=` (`(p,q)=(3,2)` is `(3,2)`; `AB=4, CD=5` is `4, 5`; `V_1:V_2=11:21` is `11:21`); a left-hand side that is an expression (`x+y=3`) is part of the
  answer (`unlabelled`);
- a ratio of numbers (`7:32`) compares as written, never as a quotient (a clock time looks the same);
- a decimal comma is read only against a number written with a decimal point: one side is such a
  number, the other exactly `digits,digits` with one comma and not three digits after it, or `0`
  before it (`1,22` and `0,111` for `1.22` and `0.111`; `1,220` is always one thousand two hundred
  and twenty; `1,2` against the gold `12` or `1, 2` is never a decimal);
- `a \\approx b` means `b` when `a` is a name (`x \\approx 11` is 11) and the exact `a` otherwise
  (`\\frac{1}{3} \\approx 0.33` is 1/3);
- a multiple-choice letter compares as the letter: `C`, `(C)`, `C)`, `\\text{(C)}`;
- a function value in an inequality is its one unknown (`0<f(x)<1` is the interval `(0, 1)`), and an
  inequality on `|x|` is the set it describes (`1\\leq|z|\\leq \\frac{3}{2}` is
  `[-\\frac{3}{2},-1]\\cup[1,\\frac{3}{2}]`);
- text answers compare case-insensitively, ignoring spaces and parentheses.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

import sympy

from verifiers.math_normalize import normalize, screen, text_key
from verifiers.math_parse import ParseError, TooLargeError, parse
from verifiers.math_readings import approximation, choice, decimal_comma, one_unknown, unlabelled
from verifiers.math_values import PM, Bare, Matrix, Rel, Seq, SetOf, SetUnion, Value

REL_TOL = 1e-6
"""Relative tolerance, used only when a decimal literal appears in the gold or the answer."""

EXACT_REL_TOL = 1e-40
"""Relative agreement at which two exact constants evaluated to 50 digits count as equal."""

N_POINTS = 4
MAX_SIMPLIFY_OPS = 80


@dataclass(frozen=True)
class Prepared:
    """One answer after normalisation and parsing (cached: the gold repeats G times per group)."""

    text: str
    percent: bool
    is_text: bool
    value: Value | None
    has_decimal: bool
    error: str | None
    big: bool = False


@dataclass(frozen=True)
class Comparison:
    """The decision and a short reason for it."""

    equal: bool
    reason: str


@functools.lru_cache(maxsize=16384)
def prepare(answer: str) -> Prepared:
    """Normalise, screen and parse one answer; never raises."""
    norm = normalize(answer)
    if norm.is_text:
        return Prepared(norm.text, norm.percent, True, None, False, None)
    why = screen(norm.text)
    if why is not None:
        return Prepared(norm.text, norm.percent, False, None, False, why)
    try:
        parsed = parse(norm.text)
    except TooLargeError:
        try:
            parsed = parse(norm.text, big=True)
        except ParseError as exc:
            return Prepared(norm.text, norm.percent, False, None, False, str(exc))
        return Prepared(norm.text, norm.percent, False, parsed.value, parsed.has_decimal, None, big=True)
    except ParseError as exc:
        return Prepared(norm.text, norm.percent, False, None, False, str(exc))
    return Prepared(norm.text, norm.percent, False, parsed.value, parsed.has_decimal, None)


def math_equal(gold: str, answer: str) -> bool:
    """True when `answer` is mathematically the same answer as `gold` (both are answer strings)."""
    return compare(gold, answer).equal


def compare(gold: str, answer: str) -> Comparison:
    """Compare two answer strings; the reason says which rule decided."""
    result = _compare(gold, answer)
    if result.equal:
        return result
    for g, a, other in ((_decimal_comma(gold), answer, answer), (gold, _decimal_comma(answer), gold)):
        if g is not None and a is not None and _decimal_number(other):
            decimal = _compare(g, a)
            if decimal.equal:
                return Comparison(True, f"{decimal.reason} (a decimal comma)")
    letters = choice(gold), choice(answer)
    if None not in letters:
        same = letters[0] == letters[1]
        return Comparison(same, "the same choice" if same else "another choice")
    for read, how in ((approximation, "read through \\approx"), (one_unknown, "a function value as the unknown")):
        g, a = read(gold), read(answer)
        if (g, a) != (gold, answer):
            read_result = _compare(g, a)
            if read_result.equal:
                return Comparison(True, f"{read_result.reason} ({how})")
    plain_gold, plain_answer = unlabelled(gold), unlabelled(answer)
    if (plain_gold, plain_answer) == (gold, answer):
        return result
    unlabelled_result = _compare(plain_gold, plain_answer)
    if unlabelled_result.equal:
        return Comparison(True, f"{unlabelled_result.reason} once labels are dropped")
    return result if prepare(gold).error is None or prepare(plain_gold).error is not None else unlabelled_result


def _decimal_comma(text: str) -> str | None:
    """`text` with its one comma read as a decimal point where that is unambiguous, else None."""
    return decimal_comma(prepare(text).text)


def _decimal_number(text: str) -> bool:
    """Whether `text` is one number written with a decimal point."""
    p = prepare(text)
    return p.has_decimal and isinstance(p.value, sympy.Basic) and p.value.is_number is True


_RATIO_RE = re.compile(r"-?\d+(?:\.\d+)?(?:\s*:\s*-?\d+(?:\.\d+)?)+")
"""A ratio of numbers (`7:32`): compared as written (a clock time looks the same, so never as a quotient)."""


def usable_reference(gold: str) -> str | None:
    """Why the gold answer `gold` cannot be judged against -- it does not parse, even with its labels
    dropped, and is not a ratio of numbers -- or None."""
    error = prepare(gold).error
    plain = unlabelled(gold)
    if error is None or prepare(plain).error is None or _RATIO_RE.fullmatch(prepare(plain).text):
        return None
    return error


def _compare(gold: str, answer: str) -> Comparison:
    g, a = prepare(gold), prepare(answer)
    if g.text == a.text:
        return Comparison(True, "same normalised text")
    if g.is_text or a.is_text:
        same = text_key(g.text) == text_key(a.text)
        return Comparison(same, "text match" if same else "different text")
    if g.value is None:
        return Comparison(False, f"reference not parsable: {g.error}")
    if a.value is None:
        return Comparison(False, f"answer rejected: {a.error}")
    if g.big or a.big:
        # Too large to evaluate (power towers): only the same structure is the same number.
        same = g.big and a.big and g.value == a.value
        return Comparison(same, "compared structurally (too large to evaluate)")
    tol = g.has_decimal or a.has_decimal
    try:
        if _has_pm(a.value) and not _has_pm(g.value) and _is_scalar(g.value):
            return Comparison(False, "hedged: \\pm answer for a single-valued reference")
        if values_equal(g.value, a.value, tol):
            return Comparison(True, "equivalent")
        if (g.percent or a.percent) and _percent_equal(g, a, tol):
            return Comparison(True, "equivalent under the percent rule")
    except (TypeError, ValueError, ArithmeticError, RecursionError, AttributeError, NotImplementedError) as exc:
        return Comparison(False, f"comparison failed: {type(exc).__name__}")
    return Comparison(False, "not equivalent")


def _percent_equal(g: Prepared, a: Prepared, tol: bool) -> bool:
    gv, av = g.value, a.value
    if not (isinstance(gv, sympy.Basic) and isinstance(av, sympy.Basic)):
        return False
    if g.percent and not a.percent:
        return values_equal(gv / 100, av, tol)
    if a.percent and not g.percent:
        return values_equal(gv, av / 100, tol)
    return False


def is_single_valued(p: Prepared) -> bool:
    """True when the gold is one value (a number, an expression, `x = 3`, a word)."""
    return p.is_text or (p.value is not None and _is_scalar(p.value) and not _has_pm(p.value))


def _is_scalar(v: Value) -> bool:
    return isinstance(v, sympy.Basic) or (isinstance(v, Rel) and v.ops == ("=",))


def _has_pm(v: object) -> bool:
    if isinstance(v, sympy.Basic):
        return v.has(PM)
    if isinstance(v, Rel):
        return any(e.has(PM) for e in v.exprs)
    for attr in ("items", "parts"):
        if hasattr(v, attr):
            return any(_has_pm(x) for x in getattr(v, attr))
    if isinstance(v, Matrix):
        return any(_has_pm(x) for row in v.rows for x in row)
    return False


def _expand_pm(v: Value) -> Value:
    """`a + PM*b` -> the bare list `a + b, a - b`; lists are expanded item by item."""
    if isinstance(v, sympy.Basic) and v.has(PM):
        return Bare((v.xreplace({PM: sympy.Integer(1)}), v.xreplace({PM: sympy.Integer(-1)})))
    if isinstance(v, (Bare, SetOf)) and _has_pm(v):
        out: list[object] = []
        for item in v.items:
            e = _expand_pm(item)  # type: ignore[arg-type]
            out.extend(e.items if isinstance(e, Bare) else (e,))
        return type(v)(tuple(out))
    return v


def _label_value(v: Value) -> sympy.Expr | None:
    """The value of `x = 3` (a lone symbol, or a chain of constants, before the last `=`)."""
    if not isinstance(v, Rel) or set(v.ops) != {"="}:
        return None
    *heads, last = v.exprs
    if heads[0].is_Symbol and not last.has(heads[0]) and all(not h.free_symbols for h in heads[1:]):
        return last
    if all(not h.free_symbols for h in heads) and not last.free_symbols:
        return last
    return None


def values_equal(g: Value, a: Value, tol: bool) -> bool:
    """Structural dispatch: both sides' shapes decide which comparison applies."""
    if _has_pm(g):
        g, a = _expand_pm(g), _expand_pm(a)
    if isinstance(g, sympy.Basic) and isinstance(a, sympy.Basic):
        return scalar_equal(g, a, tol)
    if isinstance(g, sympy.Basic) and isinstance(a, Rel):
        label = _label_value(a)
        return label is not None and scalar_equal(g, label, tol)
    if isinstance(g, Rel):
        return _relation_equal(g, a, tol)
    if isinstance(g, Seq) and isinstance(a, Seq):
        if (g.open, g.close) != (a.open, a.close) or len(g.items) != len(a.items):
            return False
        return all(values_equal(x, y, tol) for x, y in zip(g.items, a.items))  # type: ignore[arg-type]
    if isinstance(g, Seq) and isinstance(a, Bare) and (g.open, g.close) == ("(", ")"):
        return len(g.items) == len(a.items) and all(
            values_equal(x, y, tol) for x, y in zip(g.items, a.items)  # type: ignore[arg-type]
        )
    if isinstance(g, (SetOf, Bare)) and isinstance(a, (SetOf, Bare)):
        return _same_members(g.items, a.items, tol)
    if isinstance(g, (SetUnion, Seq, SetOf, Bare)) and isinstance(a, (SetUnion, Seq)):
        gs, as_ = real_set(g), real_set(a)
        return gs is not None and as_ is not None and sets_equal(gs, as_, tol)
    if isinstance(g, Matrix) and isinstance(a, Matrix):
        if len(g.rows) != len(a.rows) or len(g.rows[0]) != len(a.rows[0]):
            return False
        return all(
            values_equal(x, y, tol)  # type: ignore[arg-type]
            for gr, ar in zip(g.rows, a.rows) for x, y in zip(gr, ar)
        )
    return False


def _same_members(gs: tuple[object, ...], as_: tuple[object, ...], tol: bool) -> bool:
    def covered(xs: tuple[object, ...], ys: tuple[object, ...]) -> bool:
        return all(any(values_equal(x, y, tol) for y in ys) for x in xs)  # type: ignore[arg-type]

    return covered(gs, as_) and covered(as_, gs)


def _relation_equal(g: Rel, a: Value, tol: bool) -> bool:
    label = _label_value(g)
    if isinstance(a, sympy.Basic):
        return label is not None and scalar_equal(label, a, tol)
    if isinstance(a, (Seq, SetUnion)):
        gs, as_ = inequality_set(g), real_set(a)
        return gs is not None and as_ is not None and sets_equal(gs, as_, tol)
    if not isinstance(a, Rel):
        return False
    if g.ops == ("=",) and a.ops == ("=",):
        return equations_equal(g, a, tol)
    if "=" in g.ops or "=" in a.ops:
        return False
    gs, as_ = inequality_set(g), inequality_set(a)
    if gs is not None and as_ is not None and _variables(g) == _variables(a):
        return sets_equal(gs, as_, tol)
    return g.ops == a.ops and all(scalar_equal(x, y, tol) for x, y in zip(g.exprs, a.exprs))


def _variables(r: Rel) -> frozenset[sympy.Symbol]:
    return frozenset().union(*(e.free_symbols for e in r.exprs))


def equations_equal(g: Rel, a: Rel, tol: bool) -> bool:
    """`l1 = r1` and `l2 = r2` are the same equation when `l1 - r1 = k (l2 - r2)`, k a nonzero constant."""
    d1 = g.exprs[0] - g.exprs[1]
    d2 = a.exprs[0] - a.exprs[1]
    if d1 == 0 or d2 == 0:
        return d1 == d2
    symbols = sorted(d1.free_symbols | d2.free_symbols, key=str)
    if not symbols:
        return scalar_equal(g.exprs[0], a.exprs[0], tol) and scalar_equal(g.exprs[1], a.exprs[1], tol)
    ratio: sympy.Expr | None = None
    for point in _points(symbols):
        v1, v2 = _at(d1, point), _at(d2, point)
        if v1 is None or v2 is None or v2 == 0:
            continue
        q = v1 / v2
        if q == 0:
            return False
        if ratio is not None and not _close(ratio, q, tol):
            return False
        ratio = q
    return ratio is not None


def inequality_set(r: Rel) -> sympy.Set | None:
    """The real set a one-variable inequality chain describes (`2 < x \\le 5` -> `(2, 5]`), or None."""
    symbols = _variables(r)
    if len(symbols) != 1 or "=" in r.ops or "!=" in r.ops:
        return None
    (x,) = symbols
    result: sympy.Set = sympy.S.Reals
    ops = {"<": sympy.StrictLessThan, ">": sympy.StrictGreaterThan, "<=": sympy.LessThan,
           ">=": sympy.GreaterThan}
    for lhs, op, rhs in zip(r.exprs, r.ops, r.exprs[1:]):
        part = _linear_solution(lhs - rhs, op, x)
        if part is None:
            part = _abs_solution(lhs - rhs, op, x)
        if part is None:
            if not _small_rational_polynomial(lhs - rhs, x):
                return None
            try:
                part = sympy.solveset(ops[op](lhs, rhs), x, domain=sympy.S.Reals)
            except (NotImplementedError, ValueError, TypeError):
                return None
        result = result.intersect(part)
    return result


def _abs_solution(d: sympy.Expr, op: str, x: sympy.Symbol) -> sympy.Set | None:
    """The solution set of `d op 0` when `d = a*|u| + b` with `u = c*x + e` linear and a, b, c, e constant
    reals (`1 \\le |z|` is `(-oo, -1] U [1, oo)`, `|x-2| < 1` is `(1, 3)`); else None."""
    terms = d.atoms(sympy.Abs)
    if len(terms) != 1:
        return None
    (term,) = terms
    inner = _one_term(term.args[0], x, x, "<")
    split = _one_term(d, term, x, op)
    if split is None or inner is None:
        return None
    root, op = split
    inside = op in ("<", "<=")  # |u| below the root: one interval around 0; above it: two rays
    strict = op in ("<", ">")
    if root < 0 or (root == 0 and strict):
        return sympy.S.EmptySet if inside else sympy.S.Reals
    if inside:
        u_set = sympy.Interval(-root, root, left_open=strict, right_open=strict)
    else:
        u_set = sympy.Union(sympy.Interval(-sympy.oo, -root, right_open=strict),
                            sympy.Interval(root, sympy.oo, left_open=strict))
    c = term.args[0].coeff(x, 1)
    return _preimage(u_set, c, term.args[0] - c * x)


def _preimage(s: sympy.Set, c: sympy.Expr, e: sympy.Expr) -> sympy.Set:
    """The set of x with `c*x + e` in `s` (a union of intervals; c != 0)."""
    if (c, e) == (1, 0):
        return s
    parts = []
    for piece in (s.args if isinstance(s, sympy.Union) else (s,)):
        lo, hi = (piece.start - e) / c, (piece.end - e) / c
        lo_open, hi_open = piece.left_open, piece.right_open
        if c.is_negative:
            lo, hi, lo_open, hi_open = hi, lo, hi_open, lo_open
        parts.append(sympy.Interval(lo, hi, left_open=lo_open, right_open=hi_open))
    return sympy.Union(*parts)


def _one_term(d: sympy.Expr, term: sympy.Expr, x: sympy.Symbol, op: str) -> tuple[sympy.Expr, str] | None:
    """For `d = a*term + b` with constant real a != 0 and b (no other `x`): (the root -b/a, `op` as it
    reads with `term` alone on the left: flipped when a < 0); else None."""
    a = d.coeff(term, 1)
    b = d - a * term
    if a.free_symbols or b.has(x) or b.free_symbols or not (a.is_real and b.is_real) or a == 0:
        return None
    flipped = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}[op] if a.is_negative else op
    return -b / a, flipped


def _small_rational_polynomial(d: sympy.Expr, x: sympy.Symbol) -> bool:
    """True for a polynomial in `x` of degree <= 4 with rational coefficients (safe for solveset)."""
    if not d.is_polynomial(x):
        return False
    poly = sympy.Poly(d, x)
    return poly.degree() <= 4 and all(c.is_Rational for c in poly.all_coeffs())


def _linear_solution(d: sympy.Expr, op: str, x: sympy.Symbol) -> sympy.Set | None:
    """The solution set of `d op 0` when `d = a*x + b` with constant real a != 0 and b; else None."""
    split = _one_term(d, x, x, op)
    if split is None:
        return None
    root, op = split
    if op in ("<", "<="):
        return sympy.Interval(-sympy.oo, root, right_open=op == "<")
    return sympy.Interval(root, sympy.oo, left_open=op == ">")


def real_set(v: Value) -> sympy.Set | None:
    """An interval, a union of intervals, or a set of real numbers as a sympy set, or None."""
    if isinstance(v, Seq):
        if len(v.items) != 2 or not all(isinstance(x, sympy.Basic) for x in v.items):
            return None
        lo, hi = v.items
        assert isinstance(lo, sympy.Expr) and isinstance(hi, sympy.Expr)
        if lo.free_symbols or hi.free_symbols or not (lo.is_extended_real and hi.is_extended_real):
            return None
        if (lo > hi) is sympy.true:
            return None
        return sympy.Interval(lo, hi, left_open=v.open == "(", right_open=v.close == ")")
    if isinstance(v, SetOf):
        if not all(isinstance(x, sympy.Basic) and not x.free_symbols for x in v.items):
            return None
        return sympy.FiniteSet(*v.items)
    if isinstance(v, SetUnion):
        parts = [real_set(p) for p in v.parts]
        return None if any(p is None for p in parts) else sympy.Union(*parts)
    if isinstance(v, Bare) and all(isinstance(x, Rel) for x in v.items):
        # `x < 0 or x > 1` (normalisation turned "or" into a comma): the union of the pieces.
        parts = [inequality_set(x) for x in v.items]  # type: ignore[arg-type]
        return None if any(p is None for p in parts) else sympy.Union(*parts)
    return None


def sets_equal(s: sympy.Set, t: sympy.Set, tol: bool) -> bool:
    """Two real sets are equal when their canonical pieces match pairwise."""
    if s == t:
        return True
    ps, pt = _pieces(s), _pieces(t)
    if ps is None or pt is None or len(ps) != len(pt):
        return False
    for x, y in zip(ps, pt):
        if type(x) is not type(y):
            return False
        if isinstance(x, sympy.Interval):
            if (x.left_open, x.right_open) != (y.left_open, y.right_open):
                return False
            if not (scalar_equal(x.start, y.start, tol) and scalar_equal(x.end, y.end, tol)):
                return False
        elif not _same_members(tuple(x), tuple(y), tol):
            return False
    return True


def _pieces(s: sympy.Set) -> list[sympy.Set] | None:
    if isinstance(s, sympy.Union):
        return list(s.args)
    if isinstance(s, (sympy.Interval, sympy.FiniteSet)):
        return [s]
    return None


def scalar_equal(a: sympy.Expr, b: sympy.Expr, tol: bool) -> bool:
    """Two scalar expressions: exact where both are rational, numeric otherwise (see module doc)."""
    if a == b:
        return True
    if a.is_Rational and b.is_Rational:
        return tol and _close(a, b, True)
    if a.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) or b.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return False
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        va, vb = _at(a, {}), _at(b, {})
        if va is None or vb is None:
            return _simplifies_to_zero(a - b)
        return _close(va, vb, tol)
    usable = 0
    for point in _points(symbols):
        va, vb = _at(a, point), _at(b, point)
        if va is None or vb is None:
            continue
        if not _close(va, vb, tol):
            return False
        usable += 1
    return usable >= 2 or _simplifies_to_zero(a - b)


def _simplifies_to_zero(d: sympy.Expr) -> bool:
    if sympy.count_ops(d) > MAX_SIMPLIFY_OPS or any(abs(r.p) > 10**30 or r.q > 10**30 for r in d.atoms(sympy.Rational)):
        return False
    return sympy.simplify(d) == 0


@functools.lru_cache(maxsize=64)
def _points_for(names: tuple[str, ...]) -> tuple[dict[str, sympy.Rational], ...]:
    """Seeded rational points, one per range: (0.1, 1), (1, 3), (3, 10), (-3, -0.1)."""
    rng = random.Random(0x5EED)
    ranges = ((10, 100, 101), (100, 300, 101), (300, 1000, 101), (-300, -10, 101))
    points = []
    for k in range(N_POINTS):
        lo, hi, den = ranges[k % len(ranges)]
        points.append({n: sympy.Rational(rng.randint(lo, hi), den) for n in names})
    return tuple(points)


def _points(symbols: list[sympy.Symbol]) -> list[dict[sympy.Symbol, sympy.Rational]]:
    table = _points_for(tuple(s.name for s in symbols))
    return [{s: p[s.name] for s in symbols} for p in table]


def _at(e: sympy.Expr, point: dict[sympy.Symbol, sympy.Rational]) -> sympy.Expr | None:
    """`e` at `point`: an exact Rational when possible, else a 50-digit sympy number; None if undefined.

    Exact substitution only into rational functions: substituting into a fractional power would
    let sympy factor the (possibly huge) radicand.
    """
    if not point:
        v = e
    elif e.is_rational_function(*point):
        v = e.xreplace(point)
    else:
        v = e.evalf(50, subs=point)
    if v.is_Rational:
        return v
    if v.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        return None
    n = v.evalf(50)
    if not n.is_number or n.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        return None
    re_, im_ = n.as_real_imag()
    if not (re_.is_Number and im_.is_Number):
        return None
    return n


def _close(x: sympy.Expr, y: sympy.Expr, tol: bool) -> bool:
    """Exact equality for two Rationals without tolerance; relative agreement otherwise.

    Magnitudes stay sympy Floats (arbitrary exponent range): `1/2004!` must not underflow to 0.
    """
    if x.is_Rational and y.is_Rational and not tol:
        return x == y
    diff = sympy.N(abs(x - y), 30)
    scale = sympy.N(sympy.Max(abs(x), abs(y)), 30)
    if not (diff.is_Number and scale.is_Number):
        return False
    if scale == 0:
        return diff == 0
    return bool(diff <= (REL_TOL if tol else EXACT_REL_TOL) * scale)
