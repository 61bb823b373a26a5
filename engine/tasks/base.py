"""Where problems come from: the `TaskSource` protocol, its configs, and the loader.

A task source feeds every stage from one place: `corpus` gives pretraining documents (prompt and
demonstration response joined), `sample` gives training tasks whose `meta["response"]` is the SFT
demonstration and whose `reference` the RL verifier checks, and `eval_tasks` gives a fixed held-out
set that `sample` and `corpus` never yield. Sources are resumable: `state_dict()` is plain JSON and
`load_state_dict` continues the exact same stream.

Sources are found like verifiers (DESIGN.md §4): an entry point in the group `assay.tasks`
(built-ins `arithmetic` and `file` are registered in our own pyproject.toml), or `module:Class`.
A loaded class is built with `Class.from_config(cfg: TaskConfig, seed: int)`.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from verifiers.base import Task

ENTRY_POINT_GROUP = "assay.tasks"
# Task field -> column name of a task file; "" = the file has no such column.
DEFAULT_COLUMNS = {"prompt": "prompt", "reference": "answer", "response": "response", "id": ""}


@runtime_checkable
class TaskSource(Protocol):
    """A reproducible stream of tasks plus a disjoint held-out set and a pretraining corpus."""

    def sample(self, n: int) -> list[Task]:
        """The next `n` training tasks; advances the stream (same seed and state, same tasks)."""
        ...

    def eval_tasks(self, n: int) -> list[Task]:
        """The first `n` tasks of a fixed held-out set, disjoint from everything `sample` yields."""
        ...

    def corpus(self, n_docs: int) -> Iterator[str]:
        """`n_docs` pretraining documents (prompt + demonstration response); no held-out problem."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the stream."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream from a `state_dict()`."""
        ...


@dataclass
class ArithmeticConfig:
    """Difficulty knobs of the built-in arithmetic generator."""

    digits: int = 1
    """Largest number of digits of each operand (operands are drawn uniformly from 0 .. 10**digits - 1)."""

    operands: int = 2
    """Numbers per expression (2 gives `a+b`, 3 gives `a+b*c`)."""

    operators: str = "+-"
    """Operators to draw from, a subset of `+-*`; precedence is the usual one."""

    answer_format: str = "answer"
    """How the demonstration writes the answer: `answer` (`Answer: 132`), `boxed` (`\\boxed{132}`) or
    `reversed` (`\\boxed{231}`: the digits least-significant first, zero-padded to the widest possible
    sum, which small transformers learn far faster; addition only). The reference is written the same way."""

    teacher_accuracy: float = 1.0
    """Fraction of training demonstrations that are right; the others drop every carry (a flawed
    teacher: `47+85` -> `22`). Addition only; the reference the verifier checks is always right."""

    def __post_init__(self) -> None:
        check_answer_knobs(self.operators, self.answer_format, self.teacher_accuracy)


ANSWER_FORMATS = ("answer", "boxed", "reversed")


def check_answer_knobs(operators: str, answer_format: str, teacher_accuracy: float) -> None:
    """Raise `ValueError` naming the `task.arithmetic.*` field when the answer knobs cannot be used."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"task.arithmetic.answer_format={answer_format!r}: expected one of {ANSWER_FORMATS}")
    if not 0.0 <= teacher_accuracy <= 1.0:
        raise ValueError(f"task.arithmetic.teacher_accuracy={teacher_accuracy}: expected a fraction in [0, 1]")
    for knob, used in (("answer_format=reversed", answer_format == "reversed"),
                       (f"teacher_accuracy={teacher_accuracy}", teacher_accuracy < 1.0)):
        if used and set(operators) != {"+"}:
            raise ValueError(f"task.arithmetic.{knob} is defined for addition only: set operators='+' "
                             f"(got {operators!r})")


@dataclass
class FileConfig:
    """A dataset file of problems (one row per task)."""

    path: str | None = None
    """The training file: `.jsonl` (one JSON object per line) or `.parquet`."""

    format: str = "auto"
    """`jsonl`, `parquet`, or `auto` (from the file extension)."""

    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    """Task field -> column name, for `prompt`, `reference`, `response` (the SFT demonstration) and
    `id`. An empty name means the file has no such column: no `id` gives `<file>:<line>` ids, no
    `response` leaves `meta["response"]` None (fine for RL, an error for SFT)."""

    verifier: str = "math"
    """Verifier (entry-point name or `module:Class`) that scores this file's tasks."""

    eval_path: str | None = None
    """A separate held-out file (same format and columns). Unset: the held-out set is a fixed slice
    of `path` (the `eval_size` rows whose prompt hashes lowest), removed from training."""


@dataclass
class TaskConfig:
    """Which task source feeds the run, and its knobs."""

    source: str = "arithmetic"
    """Entry-point name in `assay.tasks` (`arithmetic`, `file`) or `module:Class`."""

    seed: int = 0
    """Seed of the training stream (the held-out set does not depend on it)."""

    eval_size: int = 64
    """Size of the held-out set that `eval_tasks` draws from."""

    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    """Knobs of the `arithmetic` source."""

    file: FileConfig = field(default_factory=FileConfig)
    """Knobs of the `file` source."""


def load_task_source(name_or_path: str, cfg: TaskConfig, seed: int) -> TaskSource:
    """Build the task source named by an `assay.tasks` entry point or by `module:Class`."""
    cls = _resolve(name_or_path)
    build = getattr(cls, "from_config", None)
    if build is None:
        raise TypeError(f"task source {name_or_path!r} ({cls!r}) has no from_config(cfg, seed) classmethod")
    source = build(cfg, seed)
    if not isinstance(source, TaskSource):
        raise TypeError(
            f"task source {name_or_path!r} built a {type(source).__name__}, which lacks the TaskSource "
            "methods sample, eval_tasks, corpus, state_dict, load_state_dict"
        )
    return source


def _resolve(name_or_path: str) -> type:
    if ":" in name_or_path:
        module_name, _, attr = name_or_path.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"task.source={name_or_path!r}: cannot load {attr!r} from {module_name!r}: {err}"
            )
    found = entry_points(group=ENTRY_POINT_GROUP).select(name=name_or_path)
    for ep in found:
        return ep.load()  # type: ignore[no-any-return]
    known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise ValueError(
        f"task.source={name_or_path!r} is not an entry point in group {ENTRY_POINT_GROUP!r} "
        f"(known: {', '.join(known) or 'none'}) nor a 'module:Class' path"
    )


def problem_hash(text: str) -> str:
    """Stable (process- and platform-independent) hash of a problem, for held-out splits."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_text(prompt: str | list[dict[str, str]]) -> str:
    """A prompt as plain text: itself, or chat messages as `role: content` lines (for corpora)."""
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt)
