"""A small LaTeX / plain-text to sympy converter: a tokenizer and a recursive-descent parser.

Why our own: sympy's LaTeX parser is built on antlr (slow to import and to run, and tied to one
antlr runtime version), and `parse_expr` evaluates Python source. This parser covers the subset
final answers use — numbers, `\\frac`, `\\sqrt`, powers, factorials, `\\binom`, `\\pi`, `e`, `i`,
variables with subscripts, implicit multiplication, trig/log functions, `\\infty`, `|x|`, floor and
ceiling, relations (`= < > \\le \\ge \\ne`), `\\pm`, tuples and intervals, `\\{...\\}` sets, `\\cup`,
`\\sum`/`\\prod` with bounds (`math_series`), and `pmatrix`-style matrices — in both LaTeX and
plain-text spelling (`sqrt(2)`, `x**2`, `2*pi`).

Safety: no `eval`, and every number that sympy would compute eagerly is bounded before it is
built: a power with a numeric base and exponent may have at most `MAX_DIGITS` digits (this also
stops power towers like `10^{10^{10}}`), a symbolic power at most `MAX_SYMBOLIC_EXPONENT`, a
factorial or binomial argument at most `MAX_FACTORIAL`, a number under a fractional power at most
`MAX_ROOT_DIGITS` digits (sympy would try to factor it); `|x|` of a complex or large argument
and binomials of non-integers stay unevaluated. Breaking a bound raises `ParseError`
with a reason; the caller turns that into a rejected answer. Nothing here uses signals or threads.

Conventions where LaTeX is ambiguous: `e` is Euler's number and `i` the imaginary unit; `\\log`
is the natural log (`\\log_b` takes a base); `\\sin^{-1}` is `asin`; a bare superscript takes a
whole number (`2^10` is 1024, the plain-text reading) while `\\frac12` and `\\sqrt3` take one digit,
as TeX does; `2\\frac{1}{2}` (an integer literal, then a fraction of two integer literals) is the
mixed number 5/2. `\\pm` becomes `+ PM*`, with `PM` a reserved symbol that `math_equiv` expands to both
signs (or treats as hedging when the gold is a single value).
"""

from __future__ import annotations

import math
import re

import sympy

from verifiers.math_series import SeriesError, series
from verifiers.math_values import PM, Bare, BigPow, Matrix, Parsed, Rel, Seq, SetOf, SetUnion, Value

MAX_DIGITS = 10_000
MAX_SYMBOLIC_EXPONENT = 1000
MAX_FACTORIAL = 5000
MAX_ROOT_DIGITS = 60
"""Largest numerator/denominator (in digits) under a fractional power: sympy factors such numbers."""


class ParseError(ValueError):
    """The text is not in the supported subset, or breaks a safety bound."""


class TooLargeError(ParseError):
    """A power too large to compute; `parse(..., big=True)` keeps it as an opaque `BigPow`."""


_FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
    "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
    "asin": sympy.asin, "acos": sympy.acos, "atan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "ln": sympy.log, "log": sympy.log, "exp": sympy.exp,
}
_INVERSE = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan}
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo, "infinity": sympy.oo, "inf": sympy.oo, "oo": sympy.oo,
              "varnothing": None, "emptyset": None}
_PLAIN_WORDS = sorted(set(_FUNCS) | {"sqrt", "pi", "infinity", "inf", "oo"}, key=len, reverse=True)
_GREEK = frozenset((
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
    "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega",
))
_RELOPS = {"=": "=", "<": "<", ">": ">", "\\lt": "<", "\\gt": ">", "\\le": "<=", "\\leq": "<=",
           "\\leqslant": "<=", "\\ge": ">=", "\\geq": ">=", "\\geqslant": ">=", "\\ne": "!=",
           "\\neq": "!=", "<=": "<=", ">=": ">=", "!=": "!=", "≤": "<=", "≥": ">=", "≠": "!="}
_MUL = {"*", "\\cdot", "\\times", "\\ast"}
_DIV = {"/", "\\div"}
_MATRIX_ENVS = {"pmatrix", "bmatrix", "Bmatrix", "vmatrix", "matrix", "smallmatrix", "array"}
_TOKEN_RE = re.compile(
    r"(?P<num>\d+\.?\d*|\.\d+)|(?P<cmd>\\[A-Za-z]+|\\[{}|\\])|(?P<op><=|>=|!=|\*\*|[-+*/^_=<>!(),\[\]{}|&'≤≥≠;:])"
    r"|(?P<letters>[A-Za-z]+)|(?P<space>\s+)"
)


def tokenize(text: str) -> list[str]:
    """Split normalised text into tokens; letter runs split into single letters except known words."""
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r} at column {pos}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "space":
            continue
        tok = m.group()
        if kind == "letters":
            tokens.extend(_split_letters(tok))
        elif tok == "**":
            tokens.append("^")
        else:
            tokens.append(tok)
    return tokens


def _split_letters(run: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(run):
        for word in _PLAIN_WORDS:
            if run.startswith(word, i):
                out.append(word)
                i += len(word)
                break
        else:
            out.append(run[i])
            i += 1
    return out


def safe_pow(base: sympy.Expr, exp: sympy.Expr, big: bool = False) -> sympy.Expr:
    """`base ** exp`, refusing results too large to compute eagerly (this also stops towers).

    With `big=True` a too-large numeric power becomes the opaque `BigPow(base, exp)` instead.
    """
    if base.is_number and not exp.is_Integer:
        digits = max((len(str(abs(r.p))) + len(str(r.q)) for r in base.atoms(sympy.Rational)), default=0)
        if digits > MAX_ROOT_DIGITS:
            if big:
                return BigPow(base, exp)
            raise TooLargeError(f"root of a number with {digits} digits (limit {MAX_ROOT_DIGITS})")
    if exp.is_number and exp.is_finite is not False:
        magnitude = abs(complex(exp.evalf(15)))
        if base.is_number:
            b = abs(complex(base.evalf(15))) if base.is_finite is not False else 1.0
            size = magnitude * abs(math.log10(b)) if b > 0 else 0.0
            if size > MAX_DIGITS:
                if big:
                    return BigPow(base, exp)
                raise TooLargeError(f"power too large: about {size:.3g} digits (limit {MAX_DIGITS})")
        elif magnitude > MAX_SYMBOLIC_EXPONENT:
            raise ParseError(f"exponent too large: about {magnitude:.3g} (limit {MAX_SYMBOLIC_EXPONENT})")
    return sympy.Pow(base, exp)


def _abs(arg: sympy.Expr) -> sympy.Expr:
    """`|arg|`; left unevaluated for complex or large arguments, where sympy's Abs can take seconds."""
    simple = not arg.has(sympy.I) and sympy.count_ops(arg) <= 10
    return sympy.Abs(arg, evaluate=simple)


def _bounded_int(x: sympy.Expr, what: str) -> sympy.Expr:
    """`x` unchanged when it is small enough to take the factorial (or binomial) of."""
    if not x.is_number:
        return x
    if x.is_Integer:
        size = float(abs(x)) if abs(x) < 10**300 else math.inf
    else:
        size = abs(complex(x.evalf(15))) if x.is_finite is not False else math.inf
    if size > MAX_FACTORIAL:
        raise ParseError(f"{what} argument too large (limit {MAX_FACTORIAL})")
    return x


def _expr(v: object, where: str) -> sympy.Expr:
    if not isinstance(v, sympy.Basic):
        raise ParseError(f"{where}: expected an expression, got a {type(v).__name__}")
    return v  # type: ignore[return-value]


class _Parser:
    """Recursive descent over the token list; one instance per parse."""

    def __init__(self, tokens: list[str], big: bool) -> None:
        self.big = big
        self.toks = tokens
        self.pos = 0
        self.has_decimal = False
        self.abs_depth = 0
        self.indices: list[str] = []

    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.toks[i] if i < len(self.toks) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end of answer")
        self.pos += 1
        return tok

    def accept(self, *options: str) -> str | None:
        tok = self.peek()
        if tok is not None and tok in options:
            self.pos += 1
            return tok
        return None

    def expect(self, tok: str) -> None:
        got = self.peek()
        if got != tok:
            raise ParseError(f"expected {tok!r} at token {self.pos}, got {got!r}")
        self.pos += 1

    # -- lists, unions, relations ---------------------------------------------------------
    def top(self) -> Value:
        items = self.items(stop={None})
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek()!r} at token {self.pos}")
        return items[0] if len(items) == 1 else Bare(tuple(items))

    def items(self, stop: set[str | None]) -> list[Value]:
        out = [self.union()]
        while self.accept(",", ";"):
            if self.peek() in stop:  # trailing comma
                break
            out.append(self.union())
        return out

    def union(self) -> Value:
        parts = [self.relation()]
        while self.accept("\\cup"):
            parts.append(self.relation())
        return parts[0] if len(parts) == 1 else SetUnion(tuple(parts))

    def relation(self) -> Value:
        first = self.sum()
        exprs = [first]
        ops: list[str] = []
        while self.peek() in _RELOPS:
            ops.append(_RELOPS[self.take()])
            exprs.append(self.sum())
        if not ops:
            return first
        return Rel(tuple(_expr(e, "relation") for e in exprs), tuple(ops))

    # -- arithmetic ------------------------------------------------------------------------
    def sum(self) -> Value:
        left = self.term()
        while True:
            op = self.accept("+", "-", "\\pm", "\\mp")
            if op is None:
                return left
            right = _expr(self.term(), op)
            left = _expr(left, op)
            left = {"+": left + right, "-": left - right, "\\pm": left + PM * right,
                    "\\mp": left - PM * right}[op]

    def term(self) -> Value:
        start = self.pos
        left = self.unary()
        if self.pos - start <= 2 and self.mixed_fraction_follows():
            # `2\frac{1}{2}` is the mixed number 5/2, not the product 1 (`-2\frac12` is -5/2).
            whole = _expr(left, "mixed number")
            part = _expr(self.power(), "mixed number")
            left = whole + part if whole >= 0 else whole - part
        while True:
            tok = self.peek()
            if tok in _MUL:
                self.take()
                left = _expr(left, tok) * _expr(self.unary(), tok)
            elif tok in _DIV:
                self.take()
                den = _expr(self.unary(), tok)
                if den == 0:
                    raise ParseError("division by zero")
                left = _expr(left, tok) / den
            elif self.starts_primary(tok):
                left = _expr(left, "product") * _expr(self.power(), "product")
            else:
                return left

    def mixed_fraction_follows(self) -> bool:
        """True after a lone integer literal when `\\frac{int}{int}` (or `\\frac12`) comes next."""
        before = self.toks[self.pos - 1] if self.pos else ""
        if not before.isdigit() or self.peek() != "\\frac":
            return False
        if self.pos >= 2 and self.toks[self.pos - 2] not in ("-", "+", "(", "[", "{", ",", "=", "\\{"):
            return False
        rest = self.toks[self.pos + 1: self.pos + 7]
        braced = len(rest) == 6 and rest[0] == rest[3] == "{" and rest[2] == rest[5] == "}"
        if braced:
            return rest[1].isdigit() and rest[4].isdigit()
        return bool(rest) and rest[0].isdigit() and len(rest[0]) == 2

    def starts_primary(self, tok: str | None) -> bool:
        if tok is None:
            return False
        if tok == "|":
            return self.abs_depth == 0
        if tok in ("(", "{", "\\{", "\\lfloor", "\\lceil", "\\sqrt", "\\frac", "\\binom", "\\begin", "\\sum", "\\prod"):
            return True
        if tok[0].isdigit() or tok[0] == "." or tok[0].isalpha():
            return True
        name = tok[1:] if tok.startswith("\\") else ""
        return name in _FUNCS or name in _CONSTANTS or name in _GREEK

    def unary(self) -> Value:
        if self.accept("-"):
            return -_expr(self.unary(), "unary minus")
        if self.accept("+"):
            return self.unary()
        if self.accept("\\pm"):
            return PM * _expr(self.unary(), "\\pm")
        if self.accept("\\mp"):
            return -PM * _expr(self.unary(), "\\mp")
        return self.power()

    def power(self) -> Value:
        base = self.postfix()
        if self.accept("^"):
            exp = self.exponent()
            return safe_pow(_expr(base, "power base"), exp, self.big)
        return base

    def exponent(self) -> sympy.Expr:
        if self.peek() == "{":
            return _expr(self.group(), "exponent")
        sign = -1 if self.accept("-") else 1
        self.accept("+")
        return sign * _expr(self.power(), "exponent")

    def postfix(self) -> Value:
        value = self.primary()
        while True:
            if self.accept("!"):
                if self.accept("!"):
                    value = sympy.factorial2(_bounded_int(_expr(value, "!!"), "factorial"))
                else:
                    value = sympy.factorial(_bounded_int(_expr(value, "!"), "factorial"))
            elif self.accept("'"):
                continue
            else:
                return value

    # -- atoms -----------------------------------------------------------------------------
    def primary(self) -> Value:
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            if "." in tok:
                self.has_decimal = True
            return sympy.Rational(tok.rstrip(".") or "0") if "." in tok else sympy.Integer(tok)
        if tok[0].isalpha():
            return self.word(tok)
        if tok in ("(", "["):
            return self.bracketed(tok)
        if tok == "{":
            self.pos -= 1
            return self.group(allow_set=True)
        if tok == "\\{":
            items = [] if self.peek() == "\\}" else self.items(stop={"\\}"})
            self.expect("\\}")
            return SetOf(tuple(items))
        if tok == "|":
            self.abs_depth += 1
            inner = self.sum()
            self.abs_depth -= 1
            self.expect("|")
            return _abs(_expr(inner, "|...|"))
        if tok in ("\\lfloor", "\\lceil"):
            inner = _expr(self.sum(), tok)
            self.expect("\\rfloor" if tok == "\\lfloor" else "\\rceil")
            return sympy.floor(inner) if tok == "\\lfloor" else sympy.ceiling(inner)
        if tok.startswith("\\"):
            return self.command(tok[1:])
        raise ParseError(f"unexpected {tok!r} at token {self.pos - 1}")

    def word(self, tok: str) -> Value:
        if tok in _FUNCS:
            return self.function(tok)
        if tok == "sqrt":
            return safe_pow(_expr(self.argument(), "sqrt"), sympy.Rational(1, 2), self.big)
        if tok in _CONSTANTS:
            return _CONSTANTS[tok]
        if tok in self.indices:
            return self.symbol(tok)
        if tok == "e":
            return sympy.E
        if tok == "i":
            return sympy.I
        return self.symbol(tok)

    def symbol(self, name: str) -> sympy.Expr:
        if self.accept("_"):
            sub = self.take()
            if sub == "{":
                parts = []
                while self.peek() not in ("}", None):
                    parts.append(self.take().lstrip("\\"))
                self.expect("}")
                sub = "".join(parts)
            name = f"{name}_{sub.lstrip(chr(92))}"
        return sympy.Symbol(name)

    def command(self, name: str) -> Value:
        if name == "frac":
            num = _expr(self.argument(), "\\frac numerator")
            den = _expr(self.argument(), "\\frac denominator")
            if den == 0:
                raise ParseError("division by zero in \\frac")
            return num / den
        if name == "sqrt":
            index = None
            if self.accept("["):
                index = _expr(self.sum(), "\\sqrt index")
                self.expect("]")
            radicand = _expr(self.argument(), "\\sqrt")
            root = sympy.Rational(1, 2) if index is None else 1 / index
            return safe_pow(radicand, root, self.big)
        if name == "binom":
            n = _bounded_int(_expr(self.argument(), "\\binom"), "binomial")
            k = _bounded_int(_expr(self.argument(), "\\binom"), "binomial")
            # Only integer binomials are evaluated: sympy expands others into long products.
            return sympy.binomial(n, k, evaluate=bool(n.is_Integer and k.is_Integer))
        if name in _FUNCS:
            return self.function(name)
        if name in _CONSTANTS:
            value = _CONSTANTS[name]
            return SetOf(()) if value is None else value
        if name in _GREEK:
            return self.symbol(name)
        if name == "begin":
            return self.matrix()
        if name in ("sum", "prod"):
            return self.series(name)
        raise ParseError(f"unsupported command \\{name}")

    def series(self, kind: str) -> sympy.Expr:
        """`\\sum_{k=a}^{b} body` (or `\\prod`); the body is the product that follows, as in TeX."""
        self.accept("\\limits", "\\nolimits")
        if not self.accept("_"):
            raise ParseError(f"\\{kind} without bounds (expected _{{k=a}}^{{b}})")
        index = self.peek(1) if self.peek() == "{" and self.peek(2) == "=" else None
        if index is None or not (index.isalpha() or index[1:] in _GREEK):
            raise ParseError(f"\\{kind} needs its index as _{{k=a}}")
        self.pos += 3
        lo = _expr(self.sum(), f"\\{kind} lower bound")
        self.expect("}")
        if not self.accept("^"):
            raise ParseError(f"\\{kind} without an upper bound (expected ^{{b}})")
        hi = self.exponent()
        name = index.lstrip("\\")
        self.indices.append(name)  # `i` and `e` name the index here, not the constants
        try:
            body = _expr(self.term(), f"\\{kind} body")
        finally:
            self.indices.pop()
        try:
            return series(kind, sympy.Symbol(name), lo, hi, body, max_digits=MAX_DIGITS,
                          max_factorial=MAX_FACTORIAL, max_exponent=MAX_SYMBOLIC_EXPONENT)
        except SeriesError as exc:
            raise ParseError(str(exc)) from exc

    def function(self, name: str) -> sympy.Expr:
        func = _FUNCS[name]
        power: sympy.Expr | None = None
        base: sympy.Expr | None = None
        if self.accept("^"):
            power = self.exponent()
            if power == -1 and name in _INVERSE:
                func, power = _INVERSE[name], None
        if name == "log" and self.accept("_"):
            base = _expr(self.argument(), "log base")
        arg = _expr(self.argument() if self.peek() in ("(", "{") else self.power(), f"\\{name}")
        value = func(arg) if base is None else sympy.log(arg, base)
        return value if power is None else safe_pow(value, power, self.big)

    def argument(self) -> Value:
        """One TeX argument: a `{group}`, a single digit of a number, or one atom."""
        tok = self.peek()
        if tok == "{":
            return self.group()
        if tok == "(":
            self.take()
            return self.bracketed("(")
        if tok is not None and tok[0].isdigit():
            if len(tok) > 1 and "." not in tok:
                self.toks[self.pos] = tok[1:]
                return sympy.Integer(tok[0])
            return self.primary()
        return self.postfix()

    def group(self, allow_set: bool = False) -> Value:
        self.expect("{")
        items = self.items(stop={"}"})
        self.expect("}")
        if len(items) == 1:
            return items[0]
        if not allow_set:
            raise ParseError("a list inside a TeX argument")
        return SetOf(tuple(items))

    def bracketed(self, open_tok: str) -> Value:
        items = self.items(stop={")", "]"})
        close = self.take()
        if close not in (")", "]"):
            raise ParseError(f"expected ')' or ']' to close {open_tok!r}, got {close!r}")
        if len(items) == 1:
            if (open_tok, close) in (("(", ")"), ("[", "]")):
                return items[0]
            raise ParseError(f"interval with one endpoint: {open_tok}...{close}")
        return Seq(open_tok, tuple(items), close)

    def matrix(self) -> Matrix:
        env = self.env_name()
        if env not in _MATRIX_ENVS:
            raise ParseError(f"unsupported environment {env!r}")
        if env == "array" and self.peek() == "{":
            while self.take() != "}":
                pass
        rows: list[tuple[object, ...]] = []
        row: list[object] = []
        while True:
            if self.accept("\\end"):
                if self.env_name() != env:
                    raise ParseError(f"\\begin{{{env}}} closed by a different \\end")
                if row:
                    rows.append(tuple(row))
                break
            if self.accept("\\\\"):
                rows.append(tuple(row))
                row = []
                continue
            row.append(self.relation())
            if not self.accept("&") and self.peek() not in ("\\\\", "\\end"):
                raise ParseError(f"unexpected {self.peek()!r} in a matrix")
        if not rows or len({len(r) for r in rows}) != 1:
            raise ParseError("matrix rows of different lengths")
        return Matrix(tuple(rows))

    def env_name(self) -> str:
        self.expect("{")
        parts = []
        while self.peek() not in ("}", None):
            parts.append(self.take())
        self.expect("}")
        return "".join(parts)


def parse(text: str, big: bool = False) -> Parsed:
    """Parse normalised answer text into a sympy expression or a structured value.

    Raises `ParseError` (with the reason) for text outside the subset or beyond a safety bound;
    `TooLargeError` for a too-large power unless `big`, which keeps such powers as `BigPow`.
    """
    parser = _Parser(tokenize(text), big)
    try:
        value = parser.top()
    except ParseError:
        raise
    except (ArithmeticError, ValueError, TypeError, AttributeError, NotImplementedError, RecursionError) as exc:
        # sympy raises many kinds of errors on odd input (PolynomialError is a ValueError, etc.).
        raise ParseError(f"cannot build expression: {type(exc).__name__}: {exc}") from exc
    return Parsed(value=value, has_decimal=parser.has_decimal)
