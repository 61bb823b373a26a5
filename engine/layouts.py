"""The shapes `cluster.placement` picks from: one `Layout` per name in `LAYOUTS` (`engine.placement`
reserves it as a Ray placement group).

Plain data and functions, no Ray, so `engine.config` reads its choice list from this table.

- `colocated`: one bundle per actor (`{"CPU": 1}`; a rollout bundle adds `rollout.gpus_per_worker`
  GPUs), all on one node (`STRICT_PACK`), so learners and rollout engines share that node's devices.
  (Learners do not reserve GPUs through Ray; a GPU rollout engine shares the device with them by
  asking for a fraction.)
- `split`: two bundles under `STRICT_SPREAD`, which puts them on two different nodes: bundle 0 holds
  every learner (`{"CPU": L}`), bundle 1 every rollout actor (`{"CPU": R, "GPU": R x gpus_per_worker}`).
  Several actors share a bundle, so the two sets are disjoint by construction; the price is that all
  learners fit on one node and all rollout actors on another.
"""

from __future__ import annotations

from dataclasses import dataclass

Bundle = dict[str, float]


@dataclass(frozen=True)
class Layout:
    """A placement group's shape: its bundles, its strategy and which bundle each actor goes to."""

    strategy: str
    bundles: list[Bundle]
    learner_bundles: list[int]
    rollout_bundles: list[int]


def _bundle(cpus: float, gpus: float) -> Bundle:
    return {"CPU": cpus, "GPU": gpus} if gpus > 0 else {"CPU": cpus}  # Ray rejects zero-valued resources


def colocated(learners: int, rollouts: int, rollout_gpus: float) -> Layout:
    """One bundle per actor, all packed on one node."""
    bundles = [_bundle(1, 0) for _ in range(learners)] + [_bundle(1, rollout_gpus) for _ in range(rollouts)]
    return Layout("STRICT_PACK", bundles, list(range(learners)), list(range(learners, learners + rollouts)))


def split(learners: int, rollouts: int, rollout_gpus: float) -> Layout:
    """Learners share bundle 0, rollout actors bundle 1; the two bundles on different nodes."""
    bundles = [_bundle(learners, 0), _bundle(rollouts, rollouts * rollout_gpus)]
    return Layout("STRICT_SPREAD", bundles, [0] * learners, [1] * rollouts)


LAYOUTS = {"colocated": colocated, "split": split}  # keyed by cluster.placement
