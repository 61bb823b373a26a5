"""Preference pairs for `stage=dpo`: a file of (prompt, chosen, rejected) rows, or generated arithmetic pairs.

Both are task sources (the `TaskSource` protocol): a training task's `meta` holds `chosen` and
`rejected` (its `response`, for corpora and SFT, is the chosen one) and `pair`, a hash of the pair's
content, which keys the reference log-probabilities the DPO stage computes once (`engine.preference`); a pair source
also says how many training pairs it draws from (`training_pairs()`).

- `pairs` (`task.pairs.path`): JSON Lines or Parquet, checked whole when the source is built, so a bad
  row stops the run at start-up naming file, line and field (`prefs.jsonl:7: field 'rejected' is
  missing (expected ...)`). The prompt is text or chat messages (rendered with the tokenizer's chat
  template, like every prompt); `chosen` and `rejected` are text or chat messages, of which the last
  must be the assistant's answer -- its content is the response (a conversation that repeats the
  prompt's messages first, TRL's implicit-prompt form, is accepted). Held-out split, epochs and resume
  are those of `task=file` (`engine.tasks.files.RowStream`).
- `arithmetic_pairs`: `task.pairs.size` problems of the `arithmetic` generator (its knobs), the right
  answer chosen and a wrong one rejected -- the carry-dropping teacher's answer where that is wrong,
  else the right answer with one digit changed -- and `task.eval_size` held-out problems. Preference
  is objective here (the math verifier can check it), which is what the demo needs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.tasks.arithmetic import ANSWER_TEMPLATES, ArithmeticSource, carry_free_sum, evaluate
from engine.tasks.base import PAIR_COLUMNS, TaskConfig, problem_hash, prompt_text
from engine.tasks.files import RecordFields, RowStream, TaskFileError, is_prompt, read_rows
from verifiers.base import Task

_EXPECTED = {
    "prompt": "a string or a list of chat messages",
    "chosen": "a string or a list of chat messages ending with the assistant's",
    "rejected": "a string or a list of chat messages ending with the assistant's",
    "id": "a string",
    "reference": "a string",
    "margin": "a number",
}


@dataclass(frozen=True)
class PairRow:
    """One validated preference pair."""

    id: str
    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    reference: str | None
    where: str  # "<file>:<line>"
    margin: float | None = None

    @property
    def key(self) -> str:
        """A hash of the pair's content: what keys its reference log-probabilities and tokens (ids may
        repeat across a training and a held-out file; equal content has equal numbers)."""
        return problem_hash(json.dumps([self.prompt, self.chosen, self.rejected]))


class PairStream(RowStream):
    """`RowStream` over `PairRow`s: tasks whose `meta` carries the pair."""

    verifier: str

    def _task(self, row: PairRow, task_id: str) -> Task:
        return Task(id=task_id, prompt=row.prompt, reference=row.reference or "", verifier=self.verifier,
                    meta={"response": row.chosen, "chosen": row.chosen, "rejected": row.rejected, "pair": row.key,
                          "source": row.where, "judged": row.reference is not None, "margin": row.margin})

    def corpus(self, n_docs: int) -> Iterator[str]:
        for row in self._corpus_rows(n_docs):
            yield prompt_text(row.prompt) + row.chosen

    def training_pairs(self) -> int:
        """How many distinct training pairs the stream draws from."""
        return len(self._train)


class PairFileSource(PairStream):
    """Preference pairs from a `.jsonl` / `.parquet` file (see the module docstring)."""

    def __init__(self, path: str, file_format: str = "auto", columns: dict[str, str] | None = None,
                 verifier: str = "math", eval_path: str | None = None, seed: int = 0, eval_size: int = 64) -> None:
        columns = {**PAIR_COLUMNS, **(columns or {})}
        unknown = sorted(set(columns) - set(PAIR_COLUMNS))
        if unknown:
            raise ValueError(f"task.pairs.columns: unknown pair fields {unknown}; known: {sorted(PAIR_COLUMNS)}")
        for required in ("prompt", "chosen", "rejected"):
            if not columns[required]:
                raise ValueError(f"task.pairs.columns.{required} must name a column")
        rows = read_rows(path, columns, file_format, make_row=_pair_row, expected=_EXPECTED)
        held = read_rows(eval_path, columns, file_format, make_row=_pair_row, expected=_EXPECTED) if eval_path else None
        self.verifier = verifier
        super().__init__(path, rows, held, eval_size, seed)

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> PairFileSource:
        p = cfg.pairs
        if not p.path:
            raise ValueError("task.source=pairs needs task.pairs.path (a .jsonl or .parquet file of preference pairs)")
        return cls(p.path, p.format, dict(p.columns), p.verifier, p.eval_path, seed=seed, eval_size=cfg.eval_size)


class ArithmeticPairsSource(PairStream):
    """Generated arithmetic preference pairs (see the module docstring)."""

    def __init__(self, problems: ArithmeticSource, size: int, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"task.pairs.size={size}: expected a positive number of training pairs")
        self.problems = problems
        self.verifier = "math"
        train = [self._pair(t.id, t.meta["expression"], random.Random(f"pairs:{seed}:{i}"))
                 for i, t in enumerate(problems.sample(size))]
        held = [self._pair(t.id, t.meta["expression"], random.Random(f"pairs-eval:{t.id}"))
                for t in problems.eval_tasks(problems.eval_size)]
        super().__init__("arithmetic_pairs", train, held, problems.eval_size, seed)

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> ArithmeticPairsSource:
        a = cfg.arithmetic
        problems = ArithmeticSource(a.digits, a.operands, a.operators, seed=seed, eval_size=cfg.eval_size,
                                    answer_format=a.answer_format)
        return cls(problems, cfg.pairs.size, seed)

    def _pair(self, pair_id: str, expression: str, rng: random.Random) -> PairRow:
        right = evaluate(expression)
        wrong = carry_free_sum(expression) if set(self.problems.operators) == {"+"} else right
        if wrong == right:  # no carry to drop (or not a sum): change one digit of the right answer
            place = 10 ** rng.randrange(len(str(abs(right))))
            wrong = right + place * rng.choice([d for d in range(-9, 10) if d and 0 <= right + place * d])
        template = ANSWER_TEMPLATES[self.problems.answer_format]
        return PairRow(id=pair_id, prompt=f"What is {expression}?\n", chosen=template.format(self.problems.written(right)),
                       rejected=template.format(self.problems.written(wrong)), reference=self.problems.written(right),
                       where=f"arithmetic_pairs:{pair_id}")


def _pair_row(record: dict[str, Any], columns: dict[str, str], where: str) -> PairRow:
    fields = RecordFields(record, columns, where, _EXPECTED)
    prompt = fields.prompt()
    sides = {}
    for side in ("chosen", "rejected"):
        value = fields.get(side)
        if isinstance(value, list) and is_prompt(value):
            if isinstance(prompt, list) and value[: len(prompt)] == prompt and len(value) > len(prompt):
                value = value[len(prompt):]  # the implicit-prompt form repeats the prompt's messages
            if len(value) != 1 or value[0]["role"] != "assistant":
                raise fields.wrong(side, value, f" with {len(value)} message(s) after the prompt, the last "
                                                f"{value[-1]['role']!r}")
            value = value[0]["content"]
        if not isinstance(value, str) or not value:
            raise fields.wrong(side, value)
        sides[side] = value
    if sides["chosen"] == sides["rejected"]:
        raise TaskFileError(f"{where}: chosen and rejected are the same text, which teaches nothing")
    reference = fields.text("reference", numbers=True) if columns["reference"] else None
    margin = None
    if columns["margin"]:
        margin = fields.get("margin")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise fields.wrong("margin", margin)
    return PairRow(id=fields.row_id(), prompt=prompt, chosen=sides["chosen"], rejected=sides["rejected"],
                   reference=reference, where=where, margin=None if margin is None else float(margin))
