"""Tasks from a dataset file: JSON Lines or Parquet, one row per problem.

The whole file is read and checked when the source is built, so a bad row stops the run at start-up
with its file, line and field (`data.jsonl:17: field 'answer' is missing (expected a string)`)
instead of crashing a rollout hours later. For Parquet the "line" is the 1-based row number.

Held-out split: either a separate `eval_path`, or the `eval_size` rows whose prompt hashes lowest
(a fixed slice that depends neither on the seed nor on row order). Training rows whose prompt equals
a held-out prompt are dropped, so duplicates cannot leak. Training draws are a seeded shuffle per
epoch; the stream position is `(epoch, pos)`, so resuming is exact. Training task ids are
`<row id>@<epoch>` (unique within an epoch's worth of draws); held-out ids are the row ids.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.tasks.base import DEFAULT_COLUMNS, TaskConfig, problem_hash, prompt_text
from verifiers.base import Task

_EXPECTED = {
    "prompt": "a string or a list of chat messages",
    "reference": "a string",
    "response": "a string",
    "id": "a string",
}


class TaskFileError(ValueError):
    """A task file that cannot be read, or a row with a missing or mistyped field."""


@dataclass(frozen=True)
class Row:
    """One validated row of a task file."""

    id: str
    prompt: str | list[dict[str, str]]
    reference: Any
    response: str | None
    where: str  # "<file>:<line>"


def read_rows(path: str | Path, columns: dict[str, str], file_format: str = "auto",
              make_row: Callable[[dict[str, Any], dict[str, str], str], Any] | None = None,
              expected: dict[str, str] | None = None) -> list[Any]:
    """All rows of a task file, validated; raises `TaskFileError` naming file, line and field.

    `make_row(record, columns, where)` builds and checks one row (default: a task `Row`; the preference
    pairs of `engine.tasks.pairs` pass their own), `expected` says what each field holds (for messages).
    """
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such task file")
    fmt = _format(path, file_format)
    records = _jsonl_records(path) if fmt == "jsonl" else _parquet_records(path, columns, expected or _EXPECTED)
    rows: list[Any] = []
    seen: dict[str, str] = {}  # id -> where it was first seen
    for line, record in records:
        row = (make_row or _row)(record, columns, f"{path}:{line}")
        if row.id in seen:
            raise TaskFileError(f"{row.where}: id {row.id!r} repeats the id of {seen[row.id]}")
        seen[row.id] = row.where
        rows.append(row)
    if not rows:
        raise TaskFileError(f"{path}: no rows")
    return rows


class RowStream:
    """The rows of a file as a seeded, resumable stream: the held-out split (a separate file, or the
    `eval_size` rows whose prompt hashes lowest, with training rows of a held-out prompt dropped) and a
    shuffle per epoch whose position `(epoch, pos)` is the state. A subclass turns a row into a task
    (`_task(row, task_id)`); `FileSource` and `engine.tasks.pairs.PairFileSource` share it."""

    def __init__(self, path: str, rows: list[Any], held: list[Any] | None, eval_size: int, seed: int) -> None:
        if held is None:
            if eval_size >= len(rows):
                raise ValueError(
                    f"task.eval_size={eval_size} leaves no training rows in {path} ({len(rows)} rows)"
                )
            held = sorted(rows, key=lambda r: problem_hash(prompt_text(r.prompt)))[:eval_size]
        held_prompts = {problem_hash(prompt_text(r.prompt)) for r in held}
        self._train = [r for r in rows if problem_hash(prompt_text(r.prompt)) not in held_prompts]
        if not self._train:
            raise ValueError(f"{path}: every row is held out (its prompt is in the held-out set)")
        self._eval = held
        self.seed = seed
        self._epoch, self._pos = 0, 0
        self._order = self._permutation("train", 0)

    def _task(self, row: Any, task_id: str) -> Task:
        raise NotImplementedError

    def sample(self, n: int) -> list[Task]:
        tasks = []
        for _ in range(n):
            if self._pos == len(self._order):
                self._epoch, self._pos = self._epoch + 1, 0
                self._order = self._permutation("train", self._epoch)
            row = self._train[self._order[self._pos]]
            tasks.append(self._task(row, f"{row.id}@{self._epoch}"))
            self._pos += 1
        return tasks

    def eval_tasks(self, n: int) -> list[Task]:
        if n > len(self._eval):
            raise ValueError(f"asked for {n} held-out tasks but the held-out set has {len(self._eval)}")
        return [self._task(row, row.id) for row in self._eval[:n]]

    def _corpus_rows(self, n_docs: int) -> Iterator[Any]:
        epoch, order = 0, self._permutation("corpus", 0)
        for i in range(n_docs):
            if i and i % len(order) == 0:
                epoch += 1
                order = self._permutation("corpus", epoch)
            yield self._train[order[i % len(order)]]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self._epoch, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"state is of a stream with seed {state['seed']}, this source has seed {self.seed}"
            )
        self._epoch, self._pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation("train", self._epoch)

    def _permutation(self, stream: str, epoch: int) -> list[int]:
        order = list(range(len(self._train)))
        random.Random(f"file:{stream}:{self.seed}:{epoch}").shuffle(order)
        return order


class FileSource(RowStream):
    """Seeded, resumable stream over the rows of a task file (see the module docstring)."""

    def __init__(
        self,
        path: str,
        file_format: str = "auto",
        columns: dict[str, str] | None = None,
        verifier: str = "math",
        eval_path: str | None = None,
        seed: int = 0,
        eval_size: int = 64,
    ) -> None:
        columns = {**DEFAULT_COLUMNS, **(columns or {})}
        unknown = sorted(set(columns) - set(DEFAULT_COLUMNS))
        if unknown:
            raise ValueError(
                f"task.file.columns: unknown task fields {unknown}; known: {sorted(DEFAULT_COLUMNS)}"
            )
        for required in ("prompt", "reference"):
            if not columns[required]:
                raise ValueError(f"task.file.columns.{required} must name a column")
        rows = read_rows(path, columns, file_format)
        held = read_rows(eval_path, columns, file_format) if eval_path else None
        self.verifier = verifier
        RowStream.__init__(self, path, rows, held, eval_size, seed)

    def references(self) -> Iterator[tuple[str, str, Any]]:
        """`(file:line, verifier, reference)` of every training and held-out row, for the engine to have
        the verifier check each reference before a run starts (`engine.runs.check_references`)."""
        for row in [*self._train, *self._eval]:
            yield row.where, self.verifier, row.reference

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> FileSource:
        f = cfg.file
        if not f.path:
            raise ValueError("task.source=file needs task.file.path (a .jsonl or .parquet file)")
        return cls(
            f.path, f.format, dict(f.columns), f.verifier, f.eval_path, seed=seed, eval_size=cfg.eval_size
        )

    def corpus(self, n_docs: int) -> Iterator[str]:
        for row in self._corpus_rows(n_docs):
            yield prompt_text(row.prompt) + (row.response or "")

    def _task(self, row: Row, task_id: str) -> Task:
        return Task(
            id=task_id,
            prompt=row.prompt,
            reference=row.reference,
            verifier=self.verifier,
            meta={"response": row.response, "source": row.where},
        )


def _format(path: Path, file_format: str) -> str:
    if file_format in ("jsonl", "parquet"):
        return file_format
    if file_format != "auto":
        raise TaskFileError(f"task.file.format={file_format!r}: expected 'jsonl', 'parquet' or 'auto'")
    by_suffix = {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
    if path.suffix.lower() not in by_suffix:
        raise TaskFileError(
            f"{path}: cannot tell the format from the extension; set task.file.format to jsonl or parquet"
        )
    return by_suffix[path.suffix.lower()]


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as fh:
        for line, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskFileError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                    f"{err.start + 1}); save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise TaskFileError(
                    f"{path}:{line}: invalid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise TaskFileError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
            yield line, record


def _parquet_records(path: Path, columns: dict[str, str], expected: dict[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise TaskFileError(f"{path}: not a readable Parquet file ({err})") from None
    for field_name, column in columns.items():
        if column and column not in table.column_names:
            raise TaskFileError(
                f"{path}: column {column!r} (task field {field_name!r}) is missing (expected "
                f"{expected[field_name]}); columns are {table.column_names}"
            )
    yield from enumerate(table.to_pylist(), start=1)


class RecordFields:
    """One record's fields read by field name through a column mapping; every error names file:line,
    the column and what was expected (`expected[field]`)."""

    def __init__(self, record: dict[str, Any], columns: dict[str, str], where: str, expected: dict[str, str]) -> None:
        self.record, self.columns, self.where, self.expected = record, columns, where, expected

    def get(self, field_name: str) -> Any:
        column = self.columns[field_name]
        if column not in self.record:
            raise TaskFileError(f"{self.where}: field {column!r} is missing (expected {self.expected[field_name]})")
        value = self.record[column]
        if value is None:
            raise TaskFileError(f"{self.where}: field {column!r} is null (expected {self.expected[field_name]})")
        return value

    def wrong(self, field_name: str, value: Any, why: str = "") -> TaskFileError:
        return TaskFileError(f"{self.where}: field {self.columns[field_name]!r} is {type(value).__name__} "
                             f"{short(value)}{why} (expected {self.expected[field_name]})")

    def prompt(self) -> str | list[dict[str, str]]:
        value = self.get("prompt")
        if not is_prompt(value):
            raise self.wrong("prompt", value)
        return value  # type: ignore[no-any-return]

    def text(self, field_name: str, numbers: bool = False) -> str:
        """A string field (`numbers`: an integer is read as its digits, as ids and math answers often are)."""
        value = self.get(field_name)
        if numbers and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise self.wrong(field_name, value)
        return value

    def row_id(self) -> str:
        """The `id` column, or `<file>:<line>` when the mapping names none."""
        return self.text("id", numbers=True) if self.columns["id"] else self.where


def _row(record: dict[str, Any], columns: dict[str, str], where: str) -> Row:
    fields = RecordFields(record, columns, where, _EXPECTED)
    prompt = fields.prompt()
    reference = fields.get("reference")
    if not isinstance(reference, dict):  # dict: the unit tests of a `unit_tests` task
        reference = fields.text("reference", numbers=True)  # the verifier reads integer answers as text
    response = fields.text("response") if columns["response"] else None
    return Row(id=fields.row_id(), prompt=prompt, reference=reference, response=response, where=where)


def is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
