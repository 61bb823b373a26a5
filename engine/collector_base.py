"""What every collector shares: the `Collector` protocol, the `CollectorContext` it is built with, and
the helpers that turn sampled groups into training groups (verification, reward shaping, whole
minibatches, rollout metrics) and the sampling seeds.

A collector decides what one RL step trains on: `collect(step)` returns the responses in group order
(G per group), their rewards `(P, G)` and the step's metrics. The RL stage builds one per run from the
table `engine.collectors.COLLECTORS` (or a `module:Class` path in `rl.collector`) and calls `collect`
from its rollout thread (`engine.ahead`), in step order. What `state_dict` returns right after step j's
`collect` is recorded in checkpoint j + 1 (next to the task stream's position), and `load_state_dict`
gets it back on resume, before the first `collect`; `finish(run_dir)` runs after the stage's final
export (a collector's own report). A collector keeps its state on itself, never in a module.

This module holds no table, so a collector's module imports it (and nothing of the other collectors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from engine.scoring import score_on_actors
from learner.algos import overlong_penalty
from rollout.types import Response
from verifiers import Task, Verdict
from verifiers.registry import display_name

if TYPE_CHECKING:  # engine.config imports the collector table: no import back at run time
    from engine.config import AssayConfig
    from engine.tasks import TaskSource
    from rollout.group import RolloutGroup

# Sampling seeds, all derived from the run's `seed`.
RUN_SEED_STRIDE = 1_000_003
"""A run seed's block of step seeds: step j of run seed s samples with `s * RUN_SEED_STRIDE + j`."""
ROUND_SEED_STRIDE = 7_919_000
"""Between the sampling rounds of one step (dynamic sampling's rounds; self-play's proposer round 0
and solver round 1)."""
EVAL_SEED_OFFSET = 7919
"""The held-out evaluation samples with `seed + EVAL_SEED_OFFSET` (RL and the supervised stages)."""


def sample_seed(run_seed: int, step: int, round_: int = 0) -> int:
    """The rollout sampling seed of round `round_` of step `step` (0-based)."""
    return run_seed * RUN_SEED_STRIDE + step + round_ * ROUND_SEED_STRIDE


def eval_seed(run_seed: int) -> int:
    """The sampling seed of every held-out evaluation of a run."""
    return run_seed + EVAL_SEED_OFFSET


@dataclass(frozen=True)
class CollectorContext:
    """What a collector is built with: the run's config and the parts of the RL stage it samples through."""

    cfg: AssayConfig
    source: TaskSource
    """The task stream; the loop checkpoints its position, the collector only draws from it."""
    rollout: RolloutGroup
    """`generate(tasks, n, sampling)`: G responses per task, in task order."""
    scorers: list[Any]
    """The verifier pool actors, for `score`."""
    run_dir: Path
    """The stage's directory, where a collector writes its report."""
    eval_tasks: list[Task]
    """The held-out tasks (a collector that writes tasks keeps them out of these)."""


@runtime_checkable
class Collector(Protocol):
    """What one RL step trains on; built as `Class(context)` (module docstring)."""

    def collect(self, step: int) -> tuple[list[Response], torch.Tensor, dict[str, float]]:
        """Step `step`'s (0-based) responses in group order, rewards `(P, G)` and metrics."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What exact resume needs (JSON-serialisable; a copy, not a view of live state)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def finish(self, run_dir: Path) -> None:
        """After the stage's final export: the collector's report, if it has one."""
        ...


def score(scorers: list[Any], tasks: list[Task], responses: list[Response],
          n: int) -> tuple[torch.Tensor, list[tuple[Task, Verdict]]]:
    """Rewards `(prompts, samples)`, NaN where the verifier could not judge (an infra error), and the
    `(task, verdict)` of every verification made. Identical responses to one prompt are verified once:
    a sharpened policy repeats itself, and a sandboxed verification costs far more than the lookup (a
    verdict depends only on the text and the task)."""
    items = [(r.text, tasks[i // n]) for i, r in enumerate(responses)]
    assert all(r.task_id == t.id for r, (_, t) in zip(responses, items)), "responses out of task order"
    slot: dict[tuple[int, str], int] = {}  # (prompt index, text) -> index into `unique`
    unique: list[tuple[str, Task]] = []
    for i, item in enumerate(items):
        if (i // n, item[0]) not in slot:
            slot[(i // n, item[0])] = len(unique)
            unique.append(item)
    verdicts = score_on_actors(scorers, unique)
    scores = [float("nan") if (v := verdicts[slot[(i // n, text)]]).score is None else float(v.score)
              for i, (text, _) in enumerate(items)]
    judged = [(task, verdict) for (_, task), verdict in zip(unique, verdicts)]
    return torch.tensor(scores, dtype=torch.float32).view(len(tasks), n), judged  # (P, G)


def composed_score(scorers: list[Any], tasks: list[Task], responses: list[Response], n: int,
                   components: list[Any]) -> tuple[torch.Tensor, list[tuple[Task, Verdict]], dict[str, float]]:
    """`score`, with the reward the weighted sum of `components` (`verifier.rewards`: each a verifier name,
    or `task` for the task's own, and a weight) when there are any: rewards `(P, G)` (NaN where any term
    could not judge; a weight-0 term only watches), every verification made, and `reward/<verifier>`
    (each term's mean over the samples it judged; the `task` term goes by the tasks' verifier when they
    share one)."""
    if not components:
        return (*score(scorers, tasks, responses, n), {})
    total = torch.zeros(len(tasks), n)
    judged: list[tuple[Task, Verdict]] = []
    metrics: dict[str, float] = {}
    for term in components:
        named = tasks if term.verifier == "task" else [replace(t, verifier=term.verifier) for t in tasks]
        rewards, verdicts = score(scorers, named, responses, n)  # (P, G)
        if term.weight:  # a weight-0 term is only logged (a gold judge to watch)
            total += term.weight * rewards  # NaN stays NaN
        judged += verdicts
        seen = rewards[~torch.isnan(rewards)]
        own = {t.verifier for t in tasks} if term.verifier == "task" else {term.verifier}
        name = display_name(own.pop()) if len(own) == 1 else "task"  # `task`: the tasks' verifier, named
        metrics[f"reward/{name}"] = float(seen.mean()) if seen.numel() else 0.0
    return total, judged, metrics


def shaped(rewards: torch.Tensor, responses: list[Response], cfg: AssayConfig) -> torch.Tensor:
    """Verifier rewards `(P, G)` plus DAPO's overlong penalty; NaN (left out) for truncated samples
    when `rl.mask_truncated`."""
    lengths = torch.tensor([len(r.response_ids) for r in responses]).view_as(rewards)
    rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_tokens, cfg.rl.overlong_buffer,
                                         cfg.rl.overlong_penalty)
    if cfg.rl.mask_truncated:
        cut = torch.tensor([r.finish_reason == "length" for r in responses]).view_as(rewards)
        rewards = rewards.masked_fill(cut, float("nan"))
    return rewards


def whole_minibatch_groups(groups: int, n: int, batch_size: int) -> int:
    """The most groups, at most `groups`, whose `n` samples each fill whole learner minibatches (maybe 0)."""
    while groups * n % batch_size:
        groups -= 1
    return groups


def rollout_metrics(responses: list[Response], rewards: torch.Tensor) -> dict[str, float]:
    """Reward and length statistics of one step's samples (`rewards` is `(P, G)`). An unjudged sample
    (NaN) is left out: a group is all solved when every judged sample is, none solved when no judged
    sample is (a group with none judged is neither)."""
    unjudged = torch.isnan(rewards)  # (P, G)
    judged = rewards[~unjudged]
    solved = rewards >= 1.0  # (P, G), False where NaN
    any_judged = (~unjudged).any(1)  # (P,)
    lengths = torch.tensor([len(r.response_ids) for r in responses], dtype=torch.float32)
    return {
        "rollout/reward_mean": float(judged.mean()) if judged.numel() else 0.0,
        "rollout/reward_std": float(judged.std()) if judged.numel() > 1 else 0.0,
        "rollout/response_len": float(lengths.mean()),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in responses) / len(responses),
        "verifier/dropped_frac": float(torch.isnan(rewards).float().mean()),
        "task/all_solved_frac": float(((solved | unjudged).all(1) & any_judged).float().mean()),
        "task/none_solved_frac": float(((~solved).all(1) & any_judged).float().mean()),
    }
