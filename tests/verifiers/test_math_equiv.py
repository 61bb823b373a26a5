"""Equivalence rules of `math_equal` / `compare`, one group per rule of the module docstring."""

from __future__ import annotations

import pytest
import sympy

from verifiers.math_equiv import (
    compare,
    equations_equal,
    inequality_set,
    is_single_valued,
    math_equal,
    prepare,
    real_set,
    scalar_equal,
    sets_equal,
)
from verifiers.math_parse import parse
from verifiers.math_values import Rel, Seq

x = sympy.Symbol("x")


def test_string_match_comes_first() -> None:
    assert compare(r"\dfrac{1}{2}", r"\frac{1}{2}").reason == "same normalised text"


@pytest.mark.parametrize(
    ("gold", "answer", "equal"),
    [
        # exact rationals: no tolerance at all without a decimal
        (r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}", False),
        (r"\frac{1}{2004!}", r"\frac{1}{2006!}", False),
        ("10^{20}", "10^{20} + 1", False),  # relative difference 1e-20, still different
        ("10^{20}", "100000000000000000000", True),
        # a decimal allows relative tolerance 1e-6, never absolute
        (r"\frac{2}{3}", "0.6666667", True),  # |2/3 - 0.6666667| / (2/3) = 5e-8
        (r"\frac{2}{3}", "0.667", False),  # 5e-4
        ("0.000001", "0.0000011", False),  # absolute gap 1e-7 but relative 0.1
        (r"\frac{1}{2004!}", "0.0", False),  # 1/2004! is tiny but not zero
        # exact constants: 50 digits
        (r"\sqrt{12}", r"2\sqrt{3}", True),
        (r"\ln 8", r"3\ln 2", True),
        (r"\sqrt{2}", r"\frac{99}{70}", False),  # 1.41421356... vs 1.41428571...
        # expressions with variables: random points
        ("(x+1)^3", "x^3+3x^2+3x+1", True),
        ("(x+1)^3", "x^3+3x^2+3x+2", False),
        (r"\frac{x}{2^{99}}", r"\frac{x}{2^{98}}", False),
        (r"\sqrt{x^2}", "x", False),  # differs at negative x
        ("2^x 2^y", "2^{x+y}", True),
    ],
)
def test_numbers_and_expressions(gold: str, answer: str, equal: bool) -> None:
    assert math_equal(gold, answer) is equal


@pytest.mark.parametrize(
    ("gold", "answer", "equal"),
    [
        (r"50\%", r"50\%", True),
        (r"50\%", "50", True),  # the sign may be dropped
        (r"50\%", "0.5", True),  # or the value read as 50/100
        ("0.5", r"50\%", True),  # the answer's explicit percent: 50/100 = 0.5
        ("0.5", "50", False),  # no sign anywhere: never x100
        ("50", "0.5", False),  # no sign anywhere: never /100
        (r"50\%", "5", False),
    ],
)
def test_percent_policy(gold: str, answer: str, equal: bool) -> None:
    assert math_equal(gold, answer) is equal


@pytest.mark.parametrize(
    ("gold", "answer", "equal"),
    [
        ("(1, 2)", "(2, 1)", False),  # tuples are ordered
        (r"\{1, 2\}", r"\{2, 1\}", True),  # sets are not
        (r"\{1, 2\}", r"\{1, 2, 3\}", False),
        ("1, 2", "2, 1", True),  # bare lists compare as sets
        ("[1, 2)", "[1, 2)", True),
        ("[1, 2)", "[1, 2]", False),
        (r"(0, 1) \cup (2, 3)", r"(2, 3) \cup (0, 1)", True),
        (r"(0, 1) \cup [1, 2)", "(0, 2)", True),  # the union is the set (0, 2)
        (r"\begin{pmatrix}1 & 0\end{pmatrix}", r"\begin{pmatrix}1 & 0\end{pmatrix}", True),
        (r"\begin{pmatrix}1 & 0\end{pmatrix}", r"\begin{pmatrix}1 \\ 0\end{pmatrix}", False),
    ],
)
def test_structures(gold: str, answer: str, equal: bool) -> None:
    assert math_equal(gold, answer) is equal


@pytest.mark.parametrize(
    ("gold", "answer", "equal"),
    [
        ("3", "x = 3", True),
        ("x = 3", "3", True),
        ("3", "2x = 6", False),  # only a lone symbol is a label
        ("y = 2x + 1", "4x - 2y + 2 = 0", True),  # (y - 2x - 1) = -1/2 (4x - 2y + 2)
        ("y = 2x + 1", "y = 2x + 2", False),
        ("x > 2", r"(2, \infty)", True),
        (r"(2, \infty)", "x > 2", False),  # the gold interval asks for interval notation
        (r"x \le -1", r"(-\infty, -1]", True),
        ("-3x > 6", r"(-\infty, -2)", True),  # dividing by -3 flips the inequality
        (r"x^2 < 4", "(-2, 2)", True),  # not linear: solved by sympy.solveset
        ("x > 2", "2 < x", True),
        ("x > 2", "y > 2", False),
    ],
)
def test_relations(gold: str, answer: str, equal: bool) -> None:
    assert math_equal(gold, answer) is equal


def test_pm_and_hedging() -> None:
    assert math_equal(r"\pm 2", "2, -2")
    assert math_equal(r"\pm 2", r"\{-2, 2\}")
    assert not math_equal(r"\pm 2", "2")
    result = compare("2", r"\pm 2")
    assert not result.equal and result.reason.startswith("hedged")


def test_text() -> None:
    assert math_equal(r"\text{Evelyn}", "EVELYN")
    assert not math_equal(r"\text{Evelyn}", "Eve")
    assert not math_equal(r"\text{Evelyn}", "5")


def test_rejections_carry_a_reason() -> None:
    assert compare("1", "x^{99999}").reason.startswith("answer rejected: exponent too large")
    assert compare(r"\foo", "1").reason.startswith("reference not parsable")


def test_too_large_values_compare_structurally() -> None:
    assert math_equal("10^{10^{10}}", "10^{10000000000}")  # same tower once 10^10 is evaluated
    assert not math_equal("10^{10^{10}}", "10^{10^{11}}")
    assert not math_equal("10^{10^{10}}", "5")


def test_prepare_is_cached() -> None:
    assert prepare(r"\frac{7}{9}") is prepare(r"\frac{7}{9}")


def test_single_valued() -> None:
    assert is_single_valued(prepare("3"))
    assert is_single_valued(prepare("x = 3"))
    assert is_single_valued(prepare(r"\text{yes}"))
    assert not is_single_valued(prepare("1, 2"))
    assert not is_single_valued(prepare(r"\pm 2"))


def test_building_blocks() -> None:
    half = sympy.Rational(1, 2)
    near = sympy.Rational(5000001, 10000000)  # 0.5000001: rel err 1e-7 / 0.5 = 2e-7 < 1e-6
    assert scalar_equal(half, near, tol=True)
    assert not scalar_equal(half, near, tol=False)
    assert not scalar_equal(half, sympy.Rational(500001, 1000000), tol=True)  # rel err 2e-6
    rel = parse("-1 < x <= 3").value
    assert isinstance(rel, Rel)
    assert inequality_set(rel) == sympy.Interval(-1, 3, left_open=True)
    seq = Seq("[", (sympy.Integer(0), sympy.oo), ")")
    assert real_set(seq) == sympy.Interval(0, sympy.oo)
    assert sets_equal(sympy.Interval(0, half), sympy.Interval(0, sympy.Rational(1, 2)), tol=False)
    line1, line2 = parse("y = 2x").value, parse("2y = 4x").value
    assert isinstance(line1, Rel) and isinstance(line2, Rel)
    assert equations_equal(line1, line2, tol=False)
