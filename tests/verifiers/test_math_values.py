"""The parser's value structures: frozen, comparable and hashable (the parse cache relies on it)."""

from __future__ import annotations

import dataclasses

import pytest
import sympy

from verifiers.math_values import PM, BigPow, Matrix, Rel, Seq, SetOf

one, two = sympy.Integer(1), sympy.Integer(2)


def test_structures_compare_by_content_and_hash() -> None:
    assert Seq("(", (one, two), "]") == Seq("(", (one, two), "]")
    assert Seq("(", (one, two), "]") != Seq("[", (one, two), "]")  # the bracket is part of the value
    assert len({SetOf((one, two)), SetOf((one, two))}) == 1
    assert hash(Matrix(((one,), (two,)))) == hash(Matrix(((one,), (two,))))


def test_structures_are_frozen() -> None:
    rel = Rel((sympy.Symbol("x"), two), (">",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rel.ops = ("<",)  # type: ignore[misc]


def test_reserved_symbols() -> None:
    # PM must not collide with a variable a model could write; BigPow never evaluates.
    assert PM != sympy.Symbol("PM")
    big = BigPow(10, 10**10)
    assert big.func.__name__ == "BigPow" and big.args == (10, 10**10)
