"""String normalisation and screening: each rule on its own."""

from __future__ import annotations

import pytest

from verifiers.math_normalize import (
    MAX_CHARS,
    MAX_DEPTH,
    Normalized,
    find_group,
    is_words,
    nesting_depth,
    normalize,
    screen,
    strip_wrappers,
    text_key,
    unwrap_commands,
)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (r"\left( 1, 2 \right)", "( 1, 2 )"),
        (r"\left\{ 1 \right\}", r"\{ 1 \}"),
        (r"1\,000", "1000"),
        (r"3\!x\;+\:1\quad", "3x+1"),
        (r"\text{5}", "5"),
        (r"\mathrm{10}", "10"),
        (r"\dfrac{1}{2} + \tfrac{1}{3}", r"\frac{1}{2} + \frac{1}{3}"),
        ("1,000,000", "1000000"),
        ("12{,}345", "12345"),
        ("1,23", "1,23"),  # not a thousands group: a list of 1 and 23
        (r"30^\circ", "30"),
        (r"45^{\circ}", "45"),
        ("60°", "60"),
        (r"\$18.90", "18.90"),
        (r"12\text{ cm}", "12"),
        (r"24 \text{ square units}", "24"),
        ("7 meters", "7"),
        ("5cm", "5"),
        ("5m", "5m"),  # a single letter glued to a number stays a variable
        ("8.", "8"),
        (r"x \in [0, 1]", "[0, 1]"),
        (r"\infty", r"\infty"),  # `\in` stripping must not eat \infty
        (r"x = 1 \text{ or } x = 2", "x = 1,x = 2"),
        ("−4", "-4"),
        (r"\displaystyle\frac{5}{6}", r"\frac{5}{6}"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    ],
)
def test_normalize_text(raw: str, text: str) -> None:
    assert normalize(raw).text == text


def test_percent_is_removed_and_flagged() -> None:
    assert normalize(r"50\%") == Normalized("50", percent=True, is_text=False)
    assert normalize("50%") == Normalized("50", percent=True, is_text=False)
    assert normalize("20 percent") == Normalized("20", percent=True, is_text=False)
    assert normalize("0.5") == Normalized("0.5", percent=False, is_text=False)


def test_text_answers() -> None:
    assert normalize(r"\text{Evelyn}") == Normalized("Evelyn", percent=False, is_text=True)
    assert normalize(r"\text{(C)}").is_text
    assert normalize("no solution").is_text
    assert not normalize("pi").is_text  # a math word, not text
    assert not normalize("x").is_text
    assert is_words("Monday") and not is_words("3 apples")
    assert text_key(" (No  Solution). ") == "nosolution"


def test_strip_wrappers() -> None:
    assert strip_wrappers(r"$\boxed{\frac{1}{2}}$") == r"\frac{1}{2}"
    assert strip_wrappers(r"\(x\)") == "x"
    assert strip_wrappers(r"\[ 3 \]") == "3"
    assert strip_wrappers("$$7$$") == "7"
    assert strip_wrappers(r"\boxed{1} + \boxed{2}") == r"\boxed{1} + \boxed{2}"  # not one wrapper


def test_find_group_and_unwrap() -> None:
    s = r"{a{b}\}c}d"
    assert find_group(s, 0) == 9  # the escaped \} does not close; the brace at index 8 does
    assert find_group("{a", 0) == -1
    assert unwrap_commands(r"\text{a \textbf{b}} c", ("text", "textbf")) == "a b c"


def test_screen() -> None:
    assert screen("1+1") is None
    assert nesting_depth("((a)[b]{c})") == 2
    too_long = "1" * (MAX_CHARS + 1)
    assert "too long" in str(screen(too_long))
    too_deep = "(" * (MAX_DEPTH + 1) + ")" * (MAX_DEPTH + 1)
    assert "nested too deeply" in str(screen(too_deep))
