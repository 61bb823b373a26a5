"""String normalisation and screening for math answers, before anything reaches sympy.

Why a separate stage: most (gold, answer) pairs in RL training are decided by a cheap string
comparison once typography is removed (`\\dfrac` vs `\\frac`, `\\left(`, `1{,}000`, `^\\circ`), and the
screening here (length, nesting depth) is what keeps hostile model output away from the parser.

What is removed or rewritten:
- wrappers: `$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`, a whole-answer `\\boxed{}` / `\\fbox{}`;
- `\\left` / `\\right` / `\\big...`, `\\displaystyle`, spacing commands (`\\,` `\\!` `\\;` `\\:` `\\quad`
  `\\qquad` `~`, `\\ `);
- `\\text{}` `\\textbf{}` `\\mathrm{}` `\\mathbf{}` `\\mbox{}` `\\operatorname{}` (content kept);
- `\\dfrac` / `\\tfrac` / `\\cfrac` -> `\\frac`; thousands separators (`1,000`, `1{,}000`, `1\\,000`,
  `11,\\! 111`, `1 000` and thin spaces: groups of exactly three digits);
- degrees (`^\\circ`, `^{\\circ}`, `°`, `\\degree`, the word "degrees"): dropped, never converted
  to radians; `\\$` and `$`; a trailing full stop; a short list of unit words after a number;
- a leading `x \\in` before an interval; the words "or" / "and" between answers become commas;
- Unicode math (`−` `×` `·` `÷` `π` `∞` `√` `≤` `≥` `≠`) becomes the LaTeX command.

Percent policy (ONE rule, used by `math_equiv`): a `%` (or `\\%`, or the word "percent") on
either side is removed here and remembered as a flag. When at least one side carried a percent
sign, the answer is accepted if it equals the gold as written OR after the side that carried the
sign is divided by 100: gold `50\\%` accepts `50\\%`, `50` and `0.5`; gold `0.5` accepts `50\\%`. With
no percent sign on either side no factor of 100 is ever applied: gold `0.5` rejects `50`, and
gold `50` rejects `0.5`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CHARS = 1000
"""Longest normalised answer that is parsed at all (longer ones are only string-compared)."""

MAX_DEPTH = 24
"""Deepest nesting of `{ ( [` accepted before parsing."""

_TEXT_COMMANDS = (
    "text", "textbf", "textit", "textrm", "textnormal", "mathrm", "mathbf", "mathit", "mathsf",
    "mbox", "operatorname", "boldsymbol", "bm", "mathbb", "mathcal",
)
_WRAPPER_COMMANDS = ("boxed", "fbox")

_UNITS = (
    "units", "unit", "square units", "sq units", "cubic units", "cm", "mm", "km", "meters", "meter",
    "metres", "metre", "m", "inches", "inch", "in", "feet", "foot", "ft", "yards", "yard", "miles",
    "mile", "mph", "seconds", "second", "sec", "s", "minutes", "minute", "min", "hours", "hour", "hrs",
    "days", "day", "weeks", "years", "grams", "gram", "kg", "g", "pounds", "lbs", "dollars", "dollar",
    "cents", "cent", "liters", "litres", "ml", "L", "degrees", "degree", "sq cm", "square feet",
    "square inches", "square meters", "cubic feet", "cubic inches", "cm^2", "cm^3", "m^2", "m^3",
    "ways", "people", "students", "points",
)
_UNIT_ALT = "|".join(sorted((re.escape(u) for u in _UNITS), key=len, reverse=True))
_UNIT_RE = re.compile(r"^(?P<value>.*?[\d}\)])\s+(?:" + _UNIT_ALT + r")\s*$")
"""A unit word after a space: `5 cm`, `12 square units`."""
_TIGHT_UNIT_RE = re.compile(r"^(?P<value>.*?\d)(?:cm|mm|km|ft|kg|mph|cm\^2|cm\^3|m\^2|m\^3)\s*$")
"""A multi-letter unit glued to a number: `5cm` (single letters stay variables: `5m` is 5*m)."""
_SPACING_RE = re.compile(r"\\[,!;:>]|\\q?quad(?![a-z]{2})|~")
"""LaTeX spacing; `\\quad` also when glued to a one-letter name (`\\quadx_2`)."""
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])\.?")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree\b|\s*\bdegrees?\b")
_PERCENT_RE = re.compile(r"\\?%|\s*\b(?:percent(?:age)?|pct)\b")
_THOUSANDS_RE = re.compile(r"(?<![\d.])([1-9]\d{0,2})((?:(?:,|\{,\})\d{3})+)(?![\d])")
_SPACED_THOUSANDS_RE = re.compile(r"(?<![\d.,])(\d{1,3})((?: \d{3})+)(?![\d.,]| \d)")
"""`1 000 000`: groups of exactly three digits after single spaces (a thin space reads as a space)."""
_TIGHT_COMMA_RE = re.compile(r"(\d)(,|\{,\})\\[!,]\s*(?=\d{3}(?!\d))")
"""`11,\\! 111`: a thousands comma followed by LaTeX spacing, as MATH writes large numbers."""
_CONNECTIVE_RE = re.compile(r"\s*(?:\\text\{\s*(?:or|and)\s*\}|\b(?:or|and)\b)\s*")
_MATH_WORDS = frozenset({
    "pi", "e", "i", "inf", "infty", "infinity", "oo", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc",
    "log", "ln", "exp", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
})
_UNICODE = {"\u2009": " ", "\u202f": " ", "\u00a0": " ",  # thin, narrow and no-break spaces
            "−": "-", "–": "-", "×": "\\times ", "·": "\\cdot ", "÷": "\\div ", "π": "\\pi ",
            "∞": "\\infty ", "√": "\\sqrt ", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne "}
_WORDS_RE = re.compile(r"^[A-Za-z][A-Za-z '\-]*[A-Za-z]$")


@dataclass(frozen=True)
class Normalized:
    """A normalised answer string and the facts removed from it on the way."""

    text: str
    percent: bool
    is_text: bool


def find_group(s: str, start: int) -> int:
    """Index just past the `}` closing the `{` at `s[start]`, or -1 when braces do not balance."""
    depth = 0
    i = start
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def unwrap_commands(s: str, names: tuple[str, ...]) -> str:
    """Replace every `\\name{X}` (for `name` in `names`) by `X`, brace-matched, innermost too."""
    pattern = re.compile(r"\\(?:" + "|".join(names) + r")\s*\{")
    for _ in range(64):
        m = pattern.search(s)
        if m is None:
            return s
        open_at = m.end() - 1
        end = find_group(s, open_at)
        if end < 0:
            return s[: m.start()] + s[m.end():]
        s = s[: m.start()] + s[open_at + 1: end - 1] + s[end:]
    return s


def strip_wrappers(s: str) -> str:
    """Remove math-mode delimiters and a `\\boxed{}` that wrap the whole string, repeatedly."""
    for _ in range(8):
        t = s.strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if t.startswith(left) and t.endswith(right) and len(t) >= len(left) + len(right):
                t = t[len(left): len(t) - len(right)].strip()
                break
        for name in _WRAPPER_COMMANDS:
            head = "\\" + name
            if t.startswith(head):
                rest = t[len(head):].lstrip()
                if rest.startswith("{") and find_group(rest, 0) == len(rest):
                    t = rest[1:-1].strip()
        if t == s:
            return t
        s = t
    return s


def nesting_depth(s: str) -> int:
    """Deepest nesting of brackets of any kind in `s`."""
    depth = best = 0
    for c in s:
        if c in "{([":
            depth += 1
            best = max(best, depth)
        elif c in "})]":
            depth -= 1
    return best


def screen(s: str) -> str | None:
    """Why `s` must not be parsed (too long, too deeply nested), or None when it may be."""
    if len(s) > MAX_CHARS:
        return f"answer too long ({len(s)} > {MAX_CHARS} characters)"
    depth = nesting_depth(s)
    if depth > MAX_DEPTH:
        return f"answer nested too deeply ({depth} > {MAX_DEPTH} levels)"
    return None


def _whole_text(s: str) -> str | None:
    """The content when `s` is exactly one `\\text{...}`-like group of words, else None."""
    m = re.match(r"^\\(?:text|textbf|textit|mathrm|mbox|textnormal)\s*\{", s)
    if m is None or find_group(s, m.end() - 1) != len(s):
        return None
    inner = s[m.end(): -1].strip()
    return inner if re.fullmatch(r"[A-Za-z()][A-Za-z ()'.\-]*", inner) else None


def is_words(s: str) -> bool:
    """True for answers that are words ("Monday", "no solution"), which compare as text."""
    return bool(_WORDS_RE.match(s)) and s.lower().replace(" ", "") not in _MATH_WORDS


def text_key(s: str) -> str:
    """The case- and punctuation-insensitive key two text answers are compared by."""
    return re.sub(r"[\s().'\-]+", "", s).lower()


def normalize(answer: str) -> Normalized:
    """Normalise one answer string (gold or model); see the module docstring for each rule."""
    for char, latex in _UNICODE.items():
        if char in answer:
            answer = answer.replace(char, latex)
    s = strip_wrappers(answer.strip())
    whole = _whole_text(s)
    if whole is not None:
        return Normalized(text=whole, percent=False, is_text=True)
    s = _CONNECTIVE_RE.sub(",", s) if re.search(r"\d|\\|=", s) else s
    s = unwrap_commands(s, _TEXT_COMMANDS)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = s.replace("\\displaystyle", "")
    s = _TIGHT_COMMA_RE.sub(r"\1\2", s)
    s = _SIZING_RE.sub("", s).replace("\\\\", "\x00")  # protect matrix row breaks
    s = _SPACING_RE.sub("", s).replace("\\ ", " ").replace("\x00", "\\\\")
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\$", "").replace("$", "")
    percent = bool(_PERCENT_RE.search(s))
    s = _PERCENT_RE.sub("", s)
    s = _THOUSANDS_RE.sub(lambda m: m.group(1) + re.sub(r"\{,\}|,", "", m.group(2)), s)
    s = _SPACED_THOUSANDS_RE.sub(lambda m: m.group(1) + m.group(2).replace(" ", ""), s)
    s = re.sub(r"^\s*[A-Za-z]\s*\\in(?![A-Za-z])\s*", "", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    m = _UNIT_RE.match(s) or _TIGHT_UNIT_RE.match(s)
    if m is not None and re.search(r"\d", m.group("value")):
        s = m.group("value").strip()
    return Normalized(text=s, percent=percent, is_text=is_words(s))
