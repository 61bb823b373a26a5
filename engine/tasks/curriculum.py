"""An adaptive curriculum: difficulty levels of one task source, sampled where the policy's groups are mixed.

Why: a GRPO-family advantage is zero for a group whose G samples are all right or all wrong, so a step
spent on problems far too easy or far too hard teaches nothing. The curriculum tracks each level's
solve rate from the verdicts (`observe`, which the RL loop calls after every scored round) and keeps
sampling where group solve rates fall inside a target band `[low, high]` (default 20-80 %).

Levels. `task.curriculum.base` names a task source with a sub-config (`arithmetic`, `linear_equations`,
`code_reasoning`, ...) and `task.curriculum.levels` lists overrides of that sub-config, easiest first:
`[{digits: 1}, {digits: 2}, {digits: 3}]` on top of `task.arithmetic`. Level `l` of `L` is the base
source built with its override and seeded `seed * L + l`: its own stream. Its tasks carry
`meta["level"] = l` and the id `L<l>-<base id>`.

The rule. A sample is solved when its reward is >= 1.0 (as the `task/*_solved_frac` metrics count it);
a group's solve rate is its solved share of the judged samples (NaN rewards are left out; a group with
none judged is skipped). Each level keeps a moving solve rate, a per-group EMA with weight `ema`: a
round with `k` groups at the level and mean group solve rate `m` moves it by `(1 - (1 - ema)**k) * (m - rate)`
(the first round at a level sets it to `m`). There is one current level: once `patience` groups were
observed at it since it last moved, it moves up one when its rate is above `high` and down one when
below `low`. Each task comes from the current level, or with probability `explore` from a neighbour
(the level above or below, uniformly), which keeps the neighbours' rates fresh: a move lands on a
level whose rate was measured recently.

Held-out set and corpus. Every level's source keeps its own `task.eval_size` held-out tasks;
`eval_tasks(n)` is the first `n` of their round-robin interleaving (level 0's first, level 1's first,
..., level 0's second, ...; a problem two levels share appears once): an equal mix of the levels that
does not follow the curriculum. No training task or corpus document of any level is a problem held out
by any level (a level with more digits can draw a one-digit problem; such draws are skipped). `corpus`
interleaves the levels' corpora round-robin.

Resume: the state is each level's stream, the sampler's position (the level of training task `j` is
drawn from a generator seeded with `(seed, j)`, no RNG state carried), the current level, the groups
seen since its last move and the moving rates: plain JSON, exact resume.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import fields, is_dataclass, replace
from itertools import zip_longest
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.tasks.base import TaskConfig, TaskSource, check_curriculum_knobs, load_task_source, prompt_text
from verifiers.base import Task

_MAX_REDRAWS = 1000  # batches in a row of held-out problems before a level is declared exhausted


class CurriculumSource:
    """Tasks from `levels` (easiest first), sampled by the rule of the module docstring."""

    def __init__(
        self, levels: Sequence[TaskSource], seed: int = 0, eval_size: int = 64, low: float = 0.2,
        high: float = 0.8, ema: float = 0.1, explore: float = 0.2, patience: int = 8, start_level: int = 0,
    ) -> None:
        check_curriculum_knobs(len(levels), low, high, ema, explore, patience, start_level)
        self.levels = list(levels)
        self.seed = seed
        self.eval_size = eval_size
        self.low, self.high, self.ema, self.explore, self.patience = low, high, ema, explore, patience
        self._eval = _unique_prompts(interleave([[_at_level(t, lv) for t in source.eval_tasks(eval_size)]
                                                 for lv, source in enumerate(self.levels)]))
        self._held = {prompt_text(t.prompt) for t in self._eval}
        self._held_lengths = {len(p) for p in self._held}
        self._position = 0  # training tasks sampled so far
        self.level = start_level  # the current level
        self._since_move = 0  # groups observed at the current level since it last moved
        self._rates: list[float | None] = [None] * len(self.levels)  # moving solve rate per level

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> CurriculumSource:
        c = cfg.curriculum
        if c.base == "curriculum" or c.base.endswith(":CurriculumSource"):
            raise ValueError(f"task.curriculum.base={c.base!r}: a curriculum cannot wrap a curriculum")
        levels = []
        for i, override in enumerate(c.levels):
            level_cfg = level_config(cfg, i)
            try:
                levels.append(load_task_source(c.base, level_cfg, seed * len(c.levels) + i))
            except ValueError as err:  # the base source's own check, which names task.<base>.<field>
                raise ValueError(f"task.curriculum.levels[{i}]={override}: {err}") from None
        return cls(levels, seed=seed, eval_size=cfg.eval_size, low=c.low, high=c.high, ema=c.ema,
                   explore=c.explore, patience=c.patience, start_level=c.start_level)

    def sample(self, n: int) -> list[Task]:
        chosen = [self._choose(self._position + j) for j in range(n)]
        self._position += n
        drawn = {lv: iter(self._draw(lv, chosen.count(lv))) for lv in sorted(set(chosen))}
        return [next(drawn[lv]) for lv in chosen]

    def observe(self, tasks: list[Task], rewards: torch.Tensor) -> dict[str, float]:
        """Update the levels' solve rates from one scored round (`rewards` (P, G), NaN: not judged),
        move the current level, and return the round's curriculum metrics."""
        task_levels = [t.meta.get("level") for t in tasks]
        by_level: dict[int, list[float]] = {}
        for lv, rate in zip(task_levels, group_solve_rates(rewards)):
            if lv is not None and rate is not None:
                by_level.setdefault(lv, []).append(rate)
        metrics = curriculum_metrics([lv for lv in task_levels if lv is not None], by_level, len(self.levels),
                                     self.low, self.high)
        for lv, rates in by_level.items():
            self._rates[lv] = moving_rate(self._rates[lv], sum(rates) / len(rates), len(rates), self.ema)
        self._since_move += len(by_level.get(self.level, []))
        moved = next_level(self.level, self._rates[self.level], self._since_move, len(self.levels),
                           self.low, self.high, self.patience)
        if moved != self.level:
            self.level, self._since_move = moved, 0
        metrics["curriculum/level"] = float(self.level)
        metrics |= {f"curriculum/rate_ema_L{lv}": r for lv, r in enumerate(self._rates) if r is not None}
        return metrics

    def eval_tasks(self, n: int) -> list[Task]:
        if n > self.eval_size:
            raise ValueError(f"asked for {n} held-out tasks but task.eval_size is {self.eval_size}")
        return self._eval[:n]

    def corpus(self, n_docs: int) -> Iterator[str]:
        # Each level's corpus generator is lazy: at most about n_docs / L documents are made per level.
        if n_docs <= 0:
            return
        streams = [source.corpus(n_docs) for source in self.levels]
        made = 0
        for doc in (d for docs in zip_longest(*streams) for d in docs if d is not None):
            if not self._is_held_out(doc):
                yield doc
                made += 1
                if made == n_docs:
                    return

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": self._position, "level": self.level,
                "since_move": self._since_move, "rates": list(self._rates),
                "levels": [source.state_dict() for source in self.levels]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or len(state["levels"]) != len(self.levels):
            raise ValueError(f"state is of a curriculum with seed {state['seed']} and {len(state['levels'])} "
                             f"levels; this one has seed {self.seed} and {len(self.levels)} levels")
        for source, level_state in zip(self.levels, state["levels"]):
            source.load_state_dict(level_state)
        self._position = int(state["position"])
        self.level = int(state["level"])
        self._since_move = int(state["since_move"])
        self._rates = [None if r is None else float(r) for r in state["rates"]]

    def _choose(self, j: int) -> int:
        """The level of training task `j`: the current one, or with probability `explore` a neighbour."""
        rng = random.Random(f"curriculum:{self.seed}:{j}")
        near = [lv for lv in (self.level - 1, self.level + 1) if 0 <= lv < len(self.levels)]
        explore = rng.random() < self.explore
        return rng.choice(near) if explore and near else self.level

    def _draw(self, level: int, k: int) -> list[Task]:
        """The next `k` tasks of `level`'s stream that no level holds out."""
        tasks: list[Task] = []
        for _ in range(_MAX_REDRAWS):
            tasks += [_at_level(t, level) for t in self.levels[level].sample(k - len(tasks))
                      if prompt_text(t.prompt) not in self._held]
            if len(tasks) == k:
                return tasks
        raise RuntimeError(f"level {level} drew only held-out problems in {_MAX_REDRAWS} batches: its "
                           "problem space is (almost) all held out by the levels; lower task.eval_size")

    def _is_held_out(self, doc: str) -> bool:
        return any(doc[:n] in self._held for n in self._held_lengths)


def level_config(cfg: TaskConfig, i: int) -> TaskConfig:
    """`cfg` with level `i`'s override applied to the base source's sub-config `task.<base>`."""
    base, override = cfg.curriculum.base, cfg.curriculum.levels[i]
    section = getattr(cfg, base, None) if base.isidentifier() else None
    if not is_dataclass(section) or base == "curriculum":
        known = [f.name for f in fields(cfg) if is_dataclass(getattr(cfg, f.name)) and f.name != "curriculum"]
        raise ValueError(f"task.curriculum.base={base!r} has no sub-config task.{base} for the levels to "
                         f"override; expected one of: {', '.join(known)}")
    allowed = [f.name for f in fields(section)]
    unknown = sorted(set(override) - set(allowed))
    if unknown:
        raise ValueError(f"task.curriculum.levels[{i}] sets {', '.join(unknown)}, which task.{base} does not "
                         f"have (its fields: {', '.join(allowed)})")
    try:  # OmegaConf checks the override's types against the dataclass; to_object runs its __post_init__
        merged: Any = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(section), override))
    except (OmegaConfBaseException, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"task.curriculum.levels[{i}]={override}: {first_line}") from None
    return replace(cfg, **{base: merged})


def group_solve_rates(rewards: torch.Tensor) -> list[float | None]:
    """Each group's share of solved samples (reward >= 1) among its judged ones; None when none was judged."""
    judged = ~torch.isnan(rewards)  # (P, G)
    solved = (torch.nan_to_num(rewards, nan=0.0) >= 1.0) & judged  # (P, G)
    counts, hits = judged.sum(1).tolist(), solved.sum(1).tolist()
    return [h / c if c else None for h, c in zip(hits, counts)]


def moving_rate(rate: float | None, mean: float, groups: int, ema: float) -> float:
    """A per-group EMA advanced by `groups` groups of mean solve rate `mean` (`rate` None: unmeasured)."""
    return mean if rate is None else rate + (1.0 - (1.0 - ema) ** groups) * (mean - rate)


def next_level(level: int, rate: float | None, since_move: int, n_levels: int, low: float, high: float,
               patience: int) -> int:
    """One level up when `rate` is above `high`, down when below `low`, once `patience` groups were seen."""
    if rate is None or since_move < patience:
        return level
    if rate > high:
        return min(level + 1, n_levels - 1)
    if rate < low:
        return max(level - 1, 0)
    return level


def curriculum_metrics(task_levels: list[int], by_level: dict[int, list[float]], n_levels: int, low: float,
                       high: float) -> dict[str, float]:
    """One round's difficulty distribution (`share_L<l>`, `level_mean`), per-level solve rates and the
    fraction of judged groups whose solve rate lies in `[low, high]`."""
    metrics: dict[str, float] = {}
    if task_levels:
        metrics["curriculum/level_mean"] = sum(task_levels) / len(task_levels)
        metrics |= {f"curriculum/share_L{lv}": task_levels.count(lv) / len(task_levels)
                    for lv in range(n_levels)}
    metrics |= {f"curriculum/solve_rate_L{lv}": sum(r) / len(r) for lv, r in sorted(by_level.items())}
    rates = [r for group_rates in by_level.values() for r in group_rates]
    if rates:
        metrics["curriculum/in_band_frac"] = sum(low <= r <= high for r in rates) / len(rates)
    return metrics


def interleave(lists: Sequence[Sequence[Task]]) -> list[Task]:
    """Round-robin: the first of each list, then the second of each, ..."""
    return [t for row in zip_longest(*lists) for t in row if t is not None]


def _unique_prompts(tasks: list[Task]) -> list[Task]:
    seen: set[str] = set()
    kept = []
    for task in tasks:
        text = prompt_text(task.prompt)
        if text not in seen:
            seen.add(text)
            kept.append(task)
    return kept


def _at_level(task: Task, level: int) -> Task:
    return replace(task, id=f"L{level}-{task.id}", meta={**task.meta, "level": level})
