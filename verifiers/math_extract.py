"""Finding the final answer in a model response.

Why it is strict by default: in RL training the reward must depend on a deliberate answer, not on
whatever number came last in the reasoning, or the policy learns to spray numbers. So `strict`
(the training default) takes only an explicit marker, and `lenient` (evaluation of models not
trained on the format) falls back to the last math block, then the whole response when it is one
short line without prose (`3x+4y+14=0`), then the last number.

Markers, looked for after the last `</think>` (a `<think>` without its `</think>` has no answer):
- the last brace-matched `\\boxed{...}` or `\\fbox{...}` (also `\\boxed 5` without braces);
- a final `Answer: ...` line (`Final answer:`, `**Answer:**`, case-insensitive).
When both are present the one that comes later wins; an `Answer:` line that contains a box is
read through the box. Every box after `</think>` is returned as well, so the verifier can see
hedging (several different boxed answers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from verifiers.math_normalize import find_group

MODES = ("strict", "lenient")

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_]*(?:final[ \t]+answer|answer)[ \t*_]*(?:is)?[ \t]*[:：][ \t*_]*(?P<body>.*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_MATH_BLOCK_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{4,}")
"""A word of four or more letters that is not a LaTeX command: the line is prose, not an answer."""
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Extraction:
    """The extracted answer (None when there is none), every box found, and how it was found."""

    answer: str | None
    boxed: tuple[str, ...]
    source: str
    reason: str


def boxed_contents(text: str) -> list[tuple[int, int, str]]:
    """`(start, end, content)` of every `\\boxed{}` / `\\fbox{}` in `text`, brace-matched, in order."""
    out: list[tuple[int, int, str]] = []
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return out
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = find_group(text, i)
            if end < 0:  # unbalanced: nothing usable after this point
                return out
            out.append((m.start(), end, text[i + 1: end - 1].strip()))
            pos = end
        else:
            word = re.match(r"[^\s$]+", text[i:])
            if word is not None and i > m.end():
                out.append((m.start(), i + word.end(), word.group()))
            pos = m.end()


_DOUBLED_COMMAND_RE = re.compile(r"(?<!\\)\\\\(?=[A-Za-z])")
"""Two backslashes before a command name (`\\\\boxed`): LaTeX escaped once more by a JSON export."""


def undouble_backslashes(text: str) -> str:
    """`text` with every doubled backslash before a command name made single (`\\\\boxed{5}` ->
    `\\boxed{5}`); a LaTeX line break (`\\\\`) followed by a space, a digit or nothing stays."""
    return _DOUBLED_COMMAND_RE.sub(lambda m: "\\", text)


_LAST_IS_RE = re.compile(r"^.*[^\\A-Za-z](?:is|equals)\s+(?P<tail>\S.*)$", re.IGNORECASE | re.DOTALL)
"""A sentence ending `... is X` / `... equals X`: the text after the LAST such verb."""


def undouble_if_all_doubled(text: str) -> str:
    """`text` with its backslashes halved when EVERY backslash in it is doubled (`\\\\left(1,2\\\\right)`,
    a response escaped once more on its way); a single command anywhere (a real `\\\\` line break in
    LaTeX with single-backslash commands around it) leaves it as it is."""
    if "\\\\" not in text or "\\" in text.replace("\\\\", ""):
        return text
    return text.replace("\\\\", "\\")


def _strip_line_answer(body: str) -> str:
    body = body.strip().strip("*_").strip()
    body = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*", "", body, flags=re.IGNORECASE)
    sentence = _LAST_IS_RE.match(body)
    if sentence is not None and _PROSE_RE.search(body):
        # "Final Answer: The largest $n$ is 34." -> 34: what the sentence says the answer is, when
        # that is math (no word of prose in it), not the $n$ it is about.
        tail = sentence.group("tail").rstrip().removesuffix(".").rstrip()
        if tail and not _PROSE_RE.search(_MATH_BLOCK_RE.sub("", tail)):
            whole = _MATH_BLOCK_RE.fullmatch(tail)
            body = next(g for g in whole.groups() if g is not None).strip() if whole else tail
    blocks = list(_MATH_BLOCK_RE.finditer(body))
    if blocks and _PROSE_RE.search(_MATH_BLOCK_RE.sub("", body)):
        # "Answer: the number of ways is $12$." -> the math, not the prose around it.
        body = next(g for g in blocks[-1].groups() if g is not None)
    if body.endswith("."):
        body = body[:-1].rstrip()
    return body


def extract_answer(response: str, mode: str = "strict") -> Extraction:
    """Extract the final answer from `response` (see the module docstring); never raises."""
    if mode not in MODES:
        raise ValueError(f"extract mode must be one of {MODES}, got {mode!r}")
    text = response
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return Extraction(None, (), "none", "no answer marker (unterminated <think>)")
    boxes = boxed_contents(text)
    boxed = tuple(c for _, _, c in boxes)
    lines = list(_ANSWER_LINE_RE.finditer(text))
    last_line = lines[-1] if lines else None
    if boxes and (last_line is None or last_line.start() < boxes[-1][1]):
        return Extraction(boxes[-1][2], boxed, "boxed", "boxed answer")
    if last_line is not None and _strip_line_answer(last_line.group("body")):
        return Extraction(_strip_line_answer(last_line.group("body")), boxed, "answer_line", "answer line")
    if mode == "strict":
        return Extraction(None, boxed, "none", "no answer marker")
    blocks = list(_MATH_BLOCK_RE.finditer(text))
    if blocks:
        body = next(g for g in blocks[-1].groups() if g is not None).strip()
        if body:
            return Extraction(body, boxed, "math_block", "last math block")
    line = text.strip()
    if line and "\n" not in line and len(line) <= 200 and not _PROSE_RE.search(line):
        return Extraction(line, boxed, "whole_response", "whole response")
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return Extraction(numbers[-1], boxed, "number", "last number")
    return Extraction(None, boxed, "none", "no answer found")
