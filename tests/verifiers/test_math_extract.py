"""Answer extraction: markers, `</think>`, strict vs lenient fallbacks."""

from __future__ import annotations

import pytest

from verifiers.math_extract import Extraction, boxed_contents, extract_answer


def test_last_box_wins_and_all_boxes_are_reported() -> None:
    found = extract_answer(r"first \boxed{1}, then \boxed{\frac{1}{2}}.")
    assert found == Extraction(r"\frac{1}{2}", ("1", r"\frac{1}{2}"), "boxed", "boxed answer")


def test_boxed_contents_brace_matching() -> None:
    text = r"\boxed{\{1, 2\}} and \fbox{a{b}c} and \boxed 7"
    assert [c for _, _, c in boxed_contents(text)] == [r"\{1, 2\}", "a{b}c", "7"]
    assert boxed_contents(r"\boxed{unclosed") == []
    assert boxed_contents(r"\boxedx{1}") == []  # another command, not a box


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("work\nAnswer: 42", "42"),
        ("work\nanswer: 42.", "42"),
        ("**Final Answer:** $3$", "$3$"),
        ("> Final answer: x = 2", "x = 2"),
        ("Final Answer: The final answer is 8", "8"),
        ("Answer: the number of ways is $12$.", "12"),  # the math block, not the prose
    ],
)
def test_answer_lines(response: str, answer: str) -> None:
    found = extract_answer(response)
    assert (found.answer, found.source) == (answer, "answer_line")


def test_later_marker_wins() -> None:
    assert extract_answer("\\boxed{5}\nAnswer: 6").answer == "6"
    assert extract_answer("Answer: 6\nso \\boxed{5}").answer == "5"
    assert extract_answer(r"Answer: \boxed{7}").source == "boxed"


def test_think_blocks() -> None:
    assert extract_answer(r"<think>\boxed{1}</think> so \boxed{2}").boxed == ("2",)
    assert extract_answer(r"<think>\boxed{1}</think> no marker").answer is None
    found = extract_answer(r"<think> still thinking \boxed{1}")
    assert found.answer is None and "unterminated" in found.reason


def test_strict_requires_a_marker() -> None:
    found = extract_answer("It is $5$, i.e. 5")
    assert found == Extraction(None, (), "none", "no answer marker")


@pytest.mark.parametrize(
    ("response", "answer", "source"),
    [
        (r"so it is $\frac{3}{4}$ overall", r"\frac{3}{4}", "math_block"),
        (r"we get \[ x^2 \] and then \(7\)", "7", "math_block"),
        ("$$1+1$$", "1+1", "math_block"),
        ("3x+4y+14=0", "3x+4y+14=0", "whole_response"),
        ("we end up with 17 apples", "17", "number"),
        ("the total is 1,250.5 dollars", "1,250.5", "number"),
        ("There is nothing here", None, "none"),
    ],
)
def test_lenient_fallbacks(response: str, answer: str | None, source: str) -> None:
    found = extract_answer(response, "lenient")
    assert (found.answer, found.source) == (answer, source)


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="'loose'"):
        extract_answer("x", "loose")
