"""What an RL step trains on (`rl.collector`): the table of collectors, and the built-in `tasks` one.

`COLLECTORS` is a plain dict, name -> class; `rl.collector` names a key, or gives a `module:Class` path
to a collector in a file of one's own. Every class follows `engine.collector_base.Collector` and is
built once per RL stage as `Class(CollectorContext)`. Adding a collector is a new module (which
imports `engine.collector_base`, never this one) plus an entry here; `engine.config` reads its choices
from this table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.collector_base import (
    Collector,
    CollectorContext,
    composed_score,
    rollout_metrics,
    sample_seed,
    shaped,
    whole_minibatch_groups,
)
from engine.scoring import step_verifier_metrics
from engine.selfplay import SelfPlayCollector
from learner.algos import informative_groups
from rollout.types import Response
from rollout.worker import sampling_from_config
from verifiers import Task, Verdict
from verifiers.registry import LoadError, load_object


class TaskCollector:
    """`rl.collector=tasks`: groups of G responses to tasks drawn from the task source. Stateless
    between steps (the task stream's position is the loop's to checkpoint)."""

    def __init__(self, ctx: CollectorContext) -> None:
        self.ctx = ctx

    def collect(self, step: int) -> tuple[list[Response], torch.Tensor, dict[str, float]]:
        """One step's training groups: responses `P'×G` in group order, shaped rewards `(P', G)` and the
        rollout metrics. Without `rl.dynamic_sampling` that is one round of `rl.prompts_per_step` prompts;
        with it, rounds of fresh prompts whose informative groups (rewards not all equal) are kept until
        `prompts_per_step` are, or `rl.max_sample_rounds` rounds are spent; then P' is the largest
        count whose samples fill whole minibatches (maybe 0: no update this step). The reward metrics are
        the first round's, an unfiltered sample of the policy. A group with a sample from weights more than
        `rl.max_staleness` versions older than step `step` trains (which `Ahead` already prevents) is
        dropped and counted (`rollout/stale_dropped`). The verifier counters are all rounds'
        (`engine.scoring.step_verifier_metrics`: infra errors per verifier, and the run's stop above
        `verifier.max_infra_error_frac`)."""
        cfg, source = self.ctx.cfg, self.ctx.source
        n, want = cfg.rollout.n, cfg.rl.prompts_per_step
        kept: list[tuple[list[Response], torch.Tensor]] = []  # (G responses, (G,) rewards) per kept group
        metrics: dict[str, float] = {"perf/rollout_s": 0.0, "perf/verify_s": 0.0}
        rounds = cfg.rl.max_sample_rounds if cfg.rl.dynamic_sampling else 1
        drawn = informative = 0
        judged: list[tuple[Task, Verdict]] = []  # every verification of the step, for its verifier counters
        for round_ in range(rounds):
            t0 = time.perf_counter()
            tasks = source.sample(want)
            sampling = sampling_from_config(cfg.rollout, seed=sample_seed(cfg.seed, step, round_))
            responses = self.ctx.rollout.generate(tasks, n, sampling)
            t1 = time.perf_counter()
            scores, verdicts, terms = composed_score(self.ctx.scorers, tasks, responses, n, cfg.verifier.rewards)
            judged += verdicts
            rewards = shaped(scores, responses, cfg)  # (P, G)
            observe = getattr(source, "observe", None)  # a source that adapts to the verdicts (a curriculum)
            if observe is not None:
                metrics.update(observe(tasks, rewards))
            metrics["perf/rollout_s"] += t1 - t0
            metrics["perf/verify_s"] += time.perf_counter() - t1
            staleness = torch.tensor([step - r.weight_version for r in responses]).view(len(tasks), n)  # (P, G)
            if round_ == 0:
                metrics.update(rollout_metrics(responses, rewards) | terms)
                metrics.update({"rollout/staleness_mean": float(staleness.float().mean()),
                                "rollout/staleness_max": float(staleness.max()), "rollout/stale_dropped": 0.0})
            keep = informative_groups(rewards) if cfg.rl.dynamic_sampling else torch.ones(len(tasks), dtype=torch.bool)
            stale = (staleness > cfg.rl.max_staleness).any(1)  # (P,)
            metrics["rollout/stale_dropped"] += float(stale.sum())
            keep &= ~stale
            drawn, informative = drawn + len(tasks), informative + int(keep.sum())
            kept += [(responses[i * n:(i + 1) * n], rewards[i]) for i in range(len(tasks)) if keep[i]]
            if len(kept) >= want:
                break
        metrics.update(step_verifier_metrics(judged, step + 1, cfg.verifier.max_infra_error_frac))  # may stop the run
        usable = whole_minibatch_groups(min(len(kept), want), n, cfg.learner.batch_size)
        if usable < want:
            print(f"[assay] step {step + 1}: dynamic sampling found {len(kept)} of the {want} groups with mixed "
                  f"rewards in {round_ + 1} rounds (rl.max_sample_rounds); training on {usable}"
                  + ("" if usable else ": no update this step"))
        if cfg.rl.dynamic_sampling:
            metrics.update({"rollout/sample_rounds": float(round_ + 1),
                            "rollout/informative_frac": informative / drawn, "rollout/kept_groups": float(usable)})
        groups = kept[:usable]
        responses = [r for group, _ in groups for r in group]
        return responses, torch.stack([rw for _, rw in groups]) if groups else torch.zeros(0, n), metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finish(self, run_dir: Path) -> None:
        pass


COLLECTORS: dict[str, Callable[[CollectorContext], Collector]] = {"tasks": TaskCollector, "selfplay": SelfPlayCollector}


def collector_class(name_or_path: str) -> Callable[[CollectorContext], Collector]:
    """The collector class `rl.collector` names: a key of COLLECTORS or a `module:Class` path. Raises
    ValueError naming the value when there is none, or it lacks a Collector method."""
    if name_or_path in COLLECTORS:
        return COLLECTORS[name_or_path]
    if ":" not in name_or_path:
        raise ValueError(f"rl.collector={name_or_path!r}: expected one of {', '.join(COLLECTORS)} "
                         "or a 'module:Class' path")
    try:
        cls = load_object(name_or_path)
    except LoadError as err:
        raise ValueError(f"rl.collector={name_or_path!r}: {err}") from err
    missing = [m for m in ("collect", "state_dict", "load_state_dict", "finish") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"rl.collector={name_or_path!r} ({cls!r}) lacks the Collector method(s) {', '.join(missing)}")
    return cls  # type: ignore[no-any-return]
