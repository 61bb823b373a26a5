"""The LaTeX / plain-text parser: values built, TeX conventions, and the safety bounds."""

from __future__ import annotations

import pytest
import sympy

from verifiers.math_parse import ParseError, TooLargeError, parse, safe_pow, tokenize
from verifiers.math_values import INDEX, PM, Bare, BigPow, Matrix, ProductOf, Rel, Seq, SetOf, SetUnion, SumOf

x, y, a, b = sympy.symbols("x y a b")


def value(text: str) -> object:
    return parse(text).value


def test_tokenize_splits_letters_but_keeps_known_words() -> None:
    assert tokenize("sinx + 2xy") == ["sin", "x", "+", "2", "x", "y"]
    assert tokenize(r"\frac{1}{2}") == ["\\frac", "{", "1", "}", "{", "2", "}"]
    assert tokenize("x**2") == ["x", "^", "2"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\frac12", sympy.Rational(1, 2)),  # TeX: one digit per argument
        (r"\frac{1}{2}", sympy.Rational(1, 2)),
        (r"\sqrt32", 2 * sympy.sqrt(3)),  # TeX reads \sqrt32 as sqrt(3) * 2
        (r"\sqrt[3]{8}", sympy.Integer(2)),
        ("2^10", sympy.Integer(1024)),  # a bare superscript takes the whole number: 2^10 = 1024
        ("2^{-2}", sympy.Rational(1, 4)),
        ("-x^2", -(x**2)),  # unary minus binds looser than ^
        ("2x(x+1)", 2 * x * (x + 1)),  # implicit multiplication
        (r"3 \cdot 4 \div 6", sympy.Integer(2)),  # 12 / 6 = 2
        ("5!", sympy.Integer(120)),
        (r"\binom{5}{2}", sympy.Integer(10)),  # 5*4/2 = 10
        (r"\log_2 8", sympy.Integer(3)),
        (r"\ln e^2", sympy.Integer(2)),
        (r"\sin^{-1}(1)", sympy.pi / 2),  # ^{-1} on a trig name is the inverse
        (r"\sin^2 x", sympy.sin(x) ** 2),
        (r"\cos\pi", sympy.Integer(-1)),
        ("e^{i\\pi}", sympy.Integer(-1)),  # e and i are the constants
        ("|-3|", sympy.Integer(3)),
        (r"\lfloor 2.5 \rfloor", sympy.Integer(2)),
        (r"\lceil 2.5 \rceil", sympy.Integer(3)),
        ("x_1 + x_{12}", sympy.Symbol("x_1") + sympy.Symbol("x_12")),
        (r"\alpha", sympy.Symbol("alpha")),
        ("2*sqrt(3)*pi", 2 * sympy.sqrt(3) * sympy.pi),
        (r"-\infty", -sympy.oo),
        ("0.25", sympy.Rational(1, 4)),  # decimals are kept exact
        (".5", sympy.Rational(1, 2)),
        (r"2\frac{1}{2}", sympy.Rational(5, 2)),  # a mixed number: 2 + 1/2
        (r"-2\frac12", sympy.Rational(-5, 2)),  # -(2 + 1/2)
        (r"2\frac{x}{2}", x),  # not integers: a product, 2 * x/2
    ],
)
def test_expressions(text: str, expected: sympy.Expr) -> None:
    assert value(text) == expected


def test_decimal_flag() -> None:
    assert parse("0.5 + x").has_decimal
    assert not parse(r"\frac{1}{2} + x").has_decimal


def test_pm_is_a_reserved_sign_symbol() -> None:
    assert value(r"1 \pm \sqrt{2}") == 1 + PM * sympy.sqrt(2)
    assert value(r"\pm 3") == 3 * PM


def test_structures() -> None:
    assert value("(1, 2]") == Seq("(", (sympy.Integer(1), sympy.Integer(2)), "]")
    assert value(r"\{1, 2\}") == SetOf((sympy.Integer(1), sympy.Integer(2)))
    assert value(r"\emptyset") == SetOf(())
    assert value("1, 2") == Bare((sympy.Integer(1), sympy.Integer(2)))
    assert value("x > 2") == Rel((x, sympy.Integer(2)), (">",))
    assert value(r"-1 < x \le 3") == Rel((sympy.Integer(-1), x, sympy.Integer(3)), ("<", "<="))
    union = value(r"(0, 1) \cup [2, 3]")
    assert isinstance(union, SetUnion) and len(union.parts) == 2
    assert value("(x)") == x  # one item in matching brackets is grouping


def test_matrix_rows() -> None:
    m = value(r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}")
    assert m == Matrix(((1, 2), (3, 4)))
    assert value(r"\begin{bmatrix} a \\ b \end{bmatrix}") == Matrix(((a,), (b,)))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("(1, 2", "unexpected end"),
        (r"\foo{2}", r"unsupported command \\foo"),
        ("1 @ 2", "unexpected character '@'"),
        (r"\frac{1}{0}", "division by zero"),
        ("(1]", "one endpoint"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 \end{pmatrix}", "different lengths"),
        ("x^{100000}", "exponent too large"),
        ("10000!", "factorial argument too large"),
        (r"\binom{100000}{2}", "binomial argument too large"),
    ],
)
def test_parse_errors_say_why(text: str, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse(text)


def test_power_towers_are_stopped_before_sympy_computes_them() -> None:
    # 10^{10^{10}} would have 10^10 digits; 2^{2^{2^{2^2}}} = 2^65536 has 65536*log10(2) ≈ 19729.
    for text in ("10^{10^{10}}", "2^{2^{2^{2^{2}}}}", "9^{9^{9^{9}}}"):
        with pytest.raises(TooLargeError, match="power too large"):
            parse(text)
    # 2^{1000} has 1000*log10(2) ≈ 301 digits: computed exactly.
    assert value("2^{1000}") == sympy.Integer(2) ** 1000


def test_big_mode_keeps_too_large_powers_opaque() -> None:
    assert parse("10^{10^{10}}", big=True).value == BigPow(10, 10**10)
    # 10^{10^{10}} and 10^{10000000000} are the same BigPow once the exponent is evaluated.
    assert parse("10^{10000000000}", big=True).value == BigPow(10, 10**10)


def test_safe_pow_bounds() -> None:
    assert safe_pow(sympy.Integer(3), sympy.Integer(4)) == 81
    assert safe_pow(x, sympy.Integer(1000)) == x**1000
    with pytest.raises(ParseError):
        safe_pow(x, sympy.Integer(1001))


def test_deep_unary_chains_are_a_parse_error_not_a_crash() -> None:
    with pytest.raises(ParseError):
        parse("-" * 5000 + "1")


n = sympy.Symbol("n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\sum_{k=1}^{10} k", sympy.Integer(55)),  # 10 * 11 / 2
        (r"\prod_{k=1}^{5} k", sympy.Integer(120)),  # 5!
        (r"\sum_{i=0}^{2} i", sympy.Integer(3)),  # `i` is the index here, not the imaginary unit
        (r"\sum_{k=0}^{3} x^k", 1 + x + x**2 + x**3),
        (r"\sum\limits_{k=1}^{n} (2k-1)", n**2),  # a polynomial summand: its closed form
        (r"\sum_{k=1}^{3} k + 1", sympy.Integer(7)),  # the body is the product that follows: (1+2+3) + 1
        (r"2\sum_{k=1}^{3} k", sympy.Integer(12)),
        (r"\sum_{k=1}^{\infty} \frac{1}{k^2}", SumOf(INDEX**-2, 1, sympy.oo)),  # never summed
        (r"\prod_{j=1}^{n} j", ProductOf(INDEX, 1, n)),  # symbolic: kept, index renamed
    ],
)
def test_sums_and_products(text: str, expected: sympy.Expr) -> None:
    assert value(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        r"\sum_{k=1}^{100} 10^{10^{k}}",  # a tower per term
        r"\sum_{k=1}^{10^9} k!",  # too many terms, each too large
        r"\sum_{k=999999}^{1000000} k!",  # two terms, both past the factorial bound
        r"\prod_{k=1}^{200} 10^{60}",  # 12000 digits in all, over MAX_DIGITS
        r"\sum_{k=1}^{3} 10^{10^{5} k}",  # 10^(300000) as the last term
    ],
)
def test_series_too_large_to_compute_stay_unevaluated(text: str) -> None:
    assert isinstance(value(text), (SumOf, ProductOf))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (r"\sum k", "without bounds"),
        (r"\sum_{k} k", "needs its index"),
        (r"\sum_{k=1} k", "without an upper bound"),
        (r"\sum_{k=1}^{k} k", "depend on its index"),
    ],
)
def test_series_without_usable_bounds_say_why(text: str, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse(text)
