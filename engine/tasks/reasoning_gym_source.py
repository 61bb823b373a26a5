"""Adapter for `reasoning-gym` (optional extra: `pip install 'assay[reasoning-gym]'`): its procedural
datasets as a task source, scored by their own `score_answer` (verifier `reasoning_gym`).

reasoning-gym (https://github.com/open-thought/reasoning-gym) has ~100 offline generators. A dataset
object holds `size` items (500 by default; some precompute them), so, like the package's own
`ReseedingDataset`, a stream here is a sequence of chunks: item `i` of a stream is item `i % size` of
the dataset built with seed `hash(run seed, stream, i // size)`. The streams are `train`, `corpus`
and the held-out `eval`, whose seeds do not depend on the run's seed (every run evaluates on the same
questions; duplicates are dropped). A training or corpus item whose question is a held-out question
is replaced by the same item of the stream `<stream>-redraw-1`, `-2`, ... So the stream position is
one integer, as in our own generators. `task.reasoning_gym.options` go to the dataset's config class
(its difficulty knobs; `size` sets the chunk length).

The prompt is the question plus one line asking for `<answer>...</answer>` (reasoning-gym's answer
format), and the demonstration is `<answer>{answer}</answer>`, or None (fine for RL, an error for
SFT) for datasets that have many right answers and give none (`graph_color`, `rubiks_cube`, ...).
The reference carries the dataset name, options and the whole entry, since some scorers read its
metadata. Entries hold tuples: sent as JSON (`assay serve-verifiers`) they become lists, which
`arc_agi` and `rearc` scorers then mark wrong; the local verifier pool keeps them intact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from engine.tasks.base import SeededStream, TaskConfig, problem_hash
from verifiers.base import Task

INSTRUCTION = "Give your final answer as <answer>...</answer>.\n"
_MAX_REDRAWS = 100
_KEEP_CHUNKS = 8  # dataset objects kept built (one per stream and chunk)


def create_dataset(name: str, options: dict[str, Any], seed: int) -> Any:
    """A reasoning-gym dataset, with a clear error when the extra is missing or the name or options are bad."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as err:
        raise ValueError("task.source=reasoning_gym needs the optional extra: pip install 'assay[reasoning-gym]' "
                         f"({err})") from None
    if name not in DATASETS:
        raise ValueError(f"task.reasoning_gym.dataset={name!r} is not a reasoning-gym dataset; "
                         f"known: {', '.join(sorted(DATASETS))}")
    try:
        return reasoning_gym.create_dataset(name, **{**options, "seed": seed})
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"task.reasoning_gym.options={options!r} for {name!r}: {err}") from None


class ReasoningGymSource(SeededStream):
    """One reasoning-gym dataset as a seeded, resumable task stream (see the module docstring)."""

    def __init__(self, dataset: str, options: dict[str, Any] | None = None, seed: int = 0, eval_size: int = 64) -> None:
        self.dataset = dataset
        self.options = dict(options or {})
        self.seed = seed
        self.eval_size = eval_size
        self._chunks: dict[tuple[str, int], Any] = {}
        self.chunk_size = len(self._chunk("eval", 0))  # builds the first dataset: checks name and options
        self._eval = self._held_out()
        self._held = {entry["question"] for entry in self._eval}
        self._index = 0  # SeededStream: the stream position

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> ReasoningGymSource:
        c = cfg.reasoning_gym
        return cls(c.dataset, dict(c.options), seed=seed, eval_size=cfg.eval_size)

    def sample(self, n: int) -> list[Task]:
        indices = self._advance(n)
        return [self._task(f"reasoning_gym-{self.seed}-{i}", self._fresh("train", i)) for i in indices]

    def eval_tasks(self, n: int) -> list[Task]:
        self._check_eval_size(n)
        return [self._task(f"reasoning_gym-eval-{i}", entry) for i, entry in enumerate(self._eval[:n])]

    def corpus(self, n_docs: int) -> Iterator[str]:
        for i in range(n_docs):
            task = self._task("", self._fresh("corpus", i))
            yield f"{task.prompt}{task.meta['response'] or ''}"

    def _entry(self, stream: str, index: int) -> dict[str, Any]:
        chunk, offset = divmod(index, self.chunk_size)
        return self._chunk(stream, chunk)[offset]  # type: ignore[no-any-return]

    def _chunk(self, stream: str, chunk: int) -> Any:
        if (stream, chunk) not in self._chunks:
            if len(self._chunks) >= _KEEP_CHUNKS:
                self._chunks.clear()
            run = "" if stream == "eval" else str(self.seed)
            seed = int(problem_hash(f"reasoning_gym:{self.dataset}:{run}:{stream}:{chunk}")[:8], 16)
            self._chunks[stream, chunk] = create_dataset(self.dataset, self.options, seed)
        return self._chunks[stream, chunk]

    def _fresh(self, stream: str, index: int) -> dict[str, Any]:
        """Item `index` of `stream`, or of its redraw streams when it is a held-out question."""
        for k in range(_MAX_REDRAWS):
            entry = self._entry(f"{stream}-redraw-{k}" if k else stream, index)
            if entry["question"] not in self._held:
                return entry
        raise ValueError(f"reasoning_gym {self.dataset!r}: {_MAX_REDRAWS} draws all landed on held-out questions; "
                         "lower task.eval_size")

    def _held_out(self) -> list[dict[str, Any]]:
        chosen: dict[str, dict[str, Any]] = {}
        for idx in range(20 * self.eval_size + 100):
            if len(chosen) == self.eval_size:
                break
            entry = self._entry("eval", idx)
            chosen.setdefault(entry["question"], entry)
        if len(chosen) < self.eval_size:
            raise ValueError(f"reasoning_gym {self.dataset!r} with options {self.options} gave only {len(chosen)} "
                             f"distinct questions for task.eval_size={self.eval_size}")
        return list(chosen.values())

    def _task(self, task_id: str, entry: dict[str, Any]) -> Task:
        answer = entry.get("answer")
        return Task(
            id=task_id,
            prompt=f"{entry['question']}\n{INSTRUCTION}",
            reference={"dataset": self.dataset, "options": self.options, "entry": entry},
            verifier="reasoning_gym",
            meta={"response": None if answer is None else f"<answer>{answer}</answer>", "dataset": self.dataset},
        )
