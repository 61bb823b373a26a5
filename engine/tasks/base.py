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
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from verifiers.base import Task
from verifiers.registry import LoadError, load_object

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

    # Optional: a source may also define `observe(tasks, rewards) -> dict[str, float]`. The RL loop then
    # calls it after every scored generation round with the round's tasks and their rewards `(P, G)`
    # (NaN: not judged) and logs the metrics it returns; a curriculum adapts its sampling there. Its
    # state belongs in `state_dict()`.


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


# Pair field -> column name of a preference file; "" = the file has no such column.
PAIR_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "", "reference": "", "margin": ""}


@dataclass
class PairsConfig:
    """Preference pairs for `stage=dpo`: a file (`task.source=pairs`) or the generated `arithmetic_pairs`."""

    path: str | None = None
    """`pairs`: the training file, `.jsonl` or `.parquet`, one (prompt, chosen, rejected) pair per row."""

    format: str = "auto"
    """`jsonl`, `parquet`, or `auto` (from the file extension)."""

    columns: dict[str, str] = field(default_factory=lambda: dict(PAIR_COLUMNS))
    """Pair field -> column name, for `prompt` (text or chat messages), `chosen` and `rejected` (text, or
    chat messages ending in the assistant's answer), and the optional `id`, `reference` (an answer the
    `verifier` checks, for the held-out accuracy) and `margin` (a number: how much better chosen is, for
    the reward model's margin loss). An empty name: the file has no such column."""

    eval_path: str | None = None
    """`pairs`: a separate held-out file. Unset: the `task.eval_size` rows whose prompt hashes lowest."""

    verifier: str = "math"
    """Verifier of the pairs' `reference` answers (the held-out greedy accuracy), when they have one."""

    size: int = 2000
    """`arithmetic_pairs`: training pairs generated (the held-out set is `task.eval_size` more)."""


@dataclass
class LinearCodeConfig:
    """Difficulty knobs of the built-in coding tasks `linear_code` (write `f(x) = a*x + b` from examples)."""

    max_slope: int = 9
    """Slopes `a` are drawn from 1 .. max_slope."""

    max_intercept: int = 99
    """Intercepts `b` are drawn from 0 .. max_intercept."""

    examples: int = 3
    """Input/output pairs the prompt shows, at x = 0, 1, ... (at least 2: two points fix a line)."""

    hidden_tests: int = 4
    """Inputs the verifier checks the program on, none of them shown in the prompt."""

    teacher_accuracy: float = 1.0
    """Fraction of training demonstrations that are right; the others read the intercept off f(1)
    instead of f(0) (a flawed teacher: `f(0)=3 f(1)=5` -> `return 2*x+5`). The hidden tests the
    verifier runs always check the right function."""


EQUATION_FORMS = ("one_sided", "bracket", "two_sided", "divided")  # a*x+b=c, a*(x+b)=c, a*x+b=c*x+d, x/a+b=c
CODE_MODES = ("deduction", "abduction", "induction")


@dataclass
class LinearEquationsConfig:
    """Difficulty knobs of the built-in `linear_equations` generator (`Solve for x: 3*x + 4 = 19`)."""

    coefficient_range: int = 9
    """Largest absolute value of a coefficient or constant (and of an integer solution)."""

    forms: list[str] = field(default_factory=lambda: list(EQUATION_FORMS))
    """Equation forms to draw from, a subset of `one_sided` (`a*x+b=c`), `bracket` (`a*(x+b)=c`),
    `two_sided` (`a*x+b=c*x+d`) and `divided` (`x/a+b=c`)."""

    integer_solutions: bool = True
    """Draw the solution as an integer and build the equation around it; False: draw every number, so
    most solutions are fractions (`-3/7`)."""


@dataclass
class CodeReasoningConfig:
    """Difficulty knobs of the built-in `code_reasoning` generator (Absolute Zero's three modes)."""

    modes: list[str] = field(default_factory=lambda: list(CODE_MODES))
    """Modes to draw from: `deduction` (program + input -> output), `abduction` (program + output ->
    an input) and `induction` (input/output pairs -> program)."""

    statements: int = 3
    """Statements in a program's body (a loop or `if` counts 1 plus its body): the program size."""

    depth: int = 1
    """How deep loops and `if`s nest in every program (0: straight-line code; at most 4 and statements - 1)."""

    list_len: int = 5
    """Longest input list (inputs are lists of 1 .. list_len integers)."""

    max_value: int = 9
    """Input list elements are drawn from 0 .. max_value."""

    examples: int = 3
    """Input/output pairs an induction prompt shows."""

    hidden_tests: int = 3
    """Further input/output pairs an induction answer is tested on, never shown."""

    isolation: str = "auto"
    """Sandbox the programs run in to compute the answers (`verifiers.sandbox`: auto or bwrap, the same
    thing: without a working bubblewrap the task source refuses to start, never runs them unsandboxed)."""


@dataclass
class ReasoningGymConfig:
    """The `reasoning_gym` adapter (optional extra `pip install 'assay[reasoning-gym]'`): one
    procedural dataset of the reasoning-gym package, scored by its own `score_answer`."""

    dataset: str = "basic_arithmetic"
    """A reasoning-gym dataset name (`reasoning_gym.factory.DATASETS`: `chain_sum`, `spell_backward`, ...)."""

    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of that dataset's config class, its difficulty knobs (`{"min_terms": 3}`)."""


@dataclass
class CurriculumConfig:
    """The adaptive `curriculum` source (`engine.tasks.curriculum`): difficulty levels of one base source,
    sampled so that most groups' solve rates fall inside the band `[low, high]`."""

    base: str = "arithmetic"
    """The `assay.tasks` source whose difficulty the curriculum varies; it must have a sub-config
    `task.<base>` (`arithmetic`, `linear_equations`, `code_reasoning`, ...) for the levels to override."""

    levels: list[dict[str, Any]] = field(default_factory=lambda: [{"digits": d} for d in (1, 2, 3)])
    """Difficulty levels, easiest first: each overrides fields of `task.<base>` (`[{digits: 1}, {digits: 2}]`
    on top of `task.arithmetic`)."""

    low: float = 0.2
    """Lower edge of the target band of group solve rates: below it the current level moves down."""

    high: float = 0.8
    """Upper edge of the target band: above it the current level moves up."""

    ema: float = 0.1
    """Weight of one group's solve rate in its level's moving solve rate (a per-group EMA)."""

    explore: float = 0.2
    """Probability that a task comes from a neighbour of the current level (the level above or below)."""

    patience: int = 8
    """Groups observed at the current level since it last moved before it may move again."""

    start_level: int = 0
    """The level the run starts at (0: the easiest)."""

    def __post_init__(self) -> None:
        check_curriculum_knobs(len(self.levels), self.low, self.high, self.ema, self.explore, self.patience,
                               self.start_level)


def check_curriculum_knobs(n_levels: int, low: float, high: float, ema: float, explore: float, patience: int,
                           start_level: int) -> None:
    """Raise `ValueError` naming the `task.curriculum.*` field whose value cannot be used."""
    if n_levels < 1:
        raise ValueError("task.curriculum.levels is empty: expected at least one level")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"task.curriculum.low={low} / task.curriculum.high={high}: "
                         "expected 0 <= low < high <= 1")
    if not 0.0 < ema <= 1.0:
        raise ValueError(f"task.curriculum.ema={ema}: expected a weight in (0, 1]")
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"task.curriculum.explore={explore}: expected a probability in [0, 1]")
    if patience < 1:
        raise ValueError(f"task.curriculum.patience={patience}: expected a positive number of groups")
    if not 0 <= start_level < n_levels:
        raise ValueError(f"task.curriculum.start_level={start_level}: "
                         f"expected a level in 0 .. {n_levels - 1}")


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


    linear_equations: LinearEquationsConfig = field(default_factory=LinearEquationsConfig)
    """Knobs of the `linear_equations` source."""

    code_reasoning: CodeReasoningConfig = field(default_factory=CodeReasoningConfig)
    """Knobs of the `code_reasoning` source."""

    reasoning_gym: ReasoningGymConfig = field(default_factory=ReasoningGymConfig)
    """Knobs of the optional `reasoning_gym` adapter."""

    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Knobs of the `curriculum` source."""

    linear_code: LinearCodeConfig = field(default_factory=LinearCodeConfig)
    """Knobs of the `linear_code` source."""

    pairs: PairsConfig = field(default_factory=PairsConfig)
    """Knobs of the preference-pair sources `pairs` (a file) and `arithmetic_pairs` (generated)."""


class SeededStream:
    """The resumable position shared by sources whose training task i is drawn from its own generator
    seeded with `(seed, i)`: the stream position is one integer, so resuming is exact. A subclass sets
    `seed` and `eval_size` and draws `sample(n)`'s tasks at the indices `_advance(n)` returns."""

    seed: int
    eval_size: int
    _index: int = 0

    def _advance(self, n: int) -> range:
        """The next `n` training indices; moves the stream past them."""
        start, self._index = self._index, self._index + n
        return range(start, start + n)

    def _check_eval_size(self, n: int) -> None:
        if n > self.eval_size:
            raise ValueError(f"asked for {n} held-out tasks but task.eval_size is {self.eval_size}")

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"state is of a stream with seed {state['seed']}, this source has seed {self.seed}")
        self._index = int(state["index"])


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
        try:
            return load_object(name_or_path)  # type: ignore[no-any-return]
        except LoadError as err:
            raise ValueError(f"task.source={name_or_path!r}: {err}") from err
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
