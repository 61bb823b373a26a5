"""Other readings of an answer's text, tried by `math_equiv.compare` only after the plain comparison
failed (so no trap case changes its answer): labels dropped, `\\approx`, multiple-choice letters,
function values as unknowns, decimal commas. Pure text functions: no sympy, no parsing."""

from __future__ import annotations

import re

_NAME = (r"(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?'*|[A-Z]{2,3}|\|[A-Z]{2,3}\||\\overline\{[A-Z]{2,3}\}"
         r"|[A-Za-z]\(\s*[A-Za-z0-9]\s*\))")
_LABELLED_RE = re.compile(
    rf"(?:\(\s*{_NAME}(?:\s*,\s*{_NAME})+\s*\)|{_NAME}(?:\s*:\s*{_NAME})*)\s*=\s*(?P<value>[^=]+)")
_SIZING_RE = re.compile(r"\\(?:left|right)(?=[(\[|.)\]])")


def unlabelled(text: str) -> str:
    """`text` with its labels dropped (the rule is in `math_equiv`'s docstring: `(p,q)=(3,2)` -> `(3,2)`, `AB=4,
    CD=5` -> `4, 5`), or `text` itself when it is not one labelled value or a list of them."""
    t = _SIZING_RE.sub("", text).strip()
    whole = _LABELLED_RE.fullmatch(t)
    if whole is not None:
        return whole.group("value").strip()
    parts = _top_level_commas(t)
    labelled = [_LABELLED_RE.fullmatch(p.strip()) for p in parts]
    if len(parts) > 1 and all(labelled):
        return ", ".join(m.group("value").strip() for m in labelled if m is not None)
    return text


def _top_level_commas(text: str) -> list[str]:
    """`text` split at the commas outside any (), [], {} or |...|-free nesting."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


_APPROX_RE = re.compile(r"\\approx(?![A-Za-z])")
_CHOICE_RE = re.compile(r"(?:\\text\{\s*)?\(?\s*([A-J])\s*\)?(?:\s*\})?")
_FUNCTION_VALUE_RE = re.compile(r"(?<![A-Za-z\\])([A-Za-z])\(\s*[a-z]\s*\)")
_INEQUALITY_RE = re.compile(r"<|>|\\[lg]eq?(?![A-Za-z])")


def approximation(text: str) -> str:
    """`text` read through one `\\approx` (the rule is in `math_equiv`'s docstring), or `text` itself."""
    parts = _APPROX_RE.split(text)
    if len(parts) != 2:
        return text
    left, right = parts[0].strip(), parts[1].strip()
    if not left or not right:
        return text
    return right if re.fullmatch(_NAME, _SIZING_RE.sub("", left)) else left


def choice(text: str) -> str | None:
    """The letter of a multiple-choice answer (`C`, `(C)`, `C)`, `\\text{(C)}`), else None."""
    m = _CHOICE_RE.fullmatch(text.strip())
    return m.group(1) if m is not None else None


def one_unknown(text: str) -> str:
    """An inequality with its function values as plain unknowns (`0<f(x)<1` -> `0<f<1`)."""
    return _FUNCTION_VALUE_RE.sub(r"\1", text) if _INEQUALITY_RE.search(text) else text


_DECIMAL_COMMA_RE = re.compile(r"(-?\d+),(\d+)")


def decimal_comma(normalized: str) -> str | None:
    """The normalized answer `digits,digits` with its comma read as a decimal point -- unless exactly
    three digits follow a part other than `0` (a thousands comma) -- else None. (`math_equiv.compare`
    reads it only against a number written with a decimal point.)"""
    m = _DECIMAL_COMMA_RE.fullmatch(normalized)
    if m is None or (len(m.group(2)) == 3 and m.group(1).lstrip("-") != "0"):
        return None
    return f"{m.group(1)}.{m.group(2)}"
