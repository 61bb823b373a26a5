"""Where the RL stage's actors run: one Ray placement group per stage, shaped by `cluster.placement`.

The group reserves every learner's and rollout actor's resources at once, before any actor starts, so
a layout the cluster cannot hold fails at once with what was asked and which nodes exist (after
`cluster.placement_timeout_s`), instead of leaving half the actors pending forever.

The layouts themselves (`colocated`, `split`) are the table `engine.layouts.LAYOUTS`.

Not done here: putting the rollout engine to sleep (freeing its KV cache) while the colocated learner
updates, which vLLM supports on CUDA (`enable_sleep_mode`) but not on CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.config import AssayConfig
from engine.layouts import LAYOUTS, Layout


@dataclass
class Placement:
    """The stage's placement group and the `.options(...)` of every learner rank and rollout actor."""

    name: str
    layout: Layout
    group: PlacementGroup
    learner_options: list[dict[str, Any]]
    rollout_options: list[dict[str, Any]]

    def record(self, run_dir: Path, learners: list[Any], rollouts: list[Any]) -> dict[str, Any]:
        """Ask each actor (`node_id()`) where it landed; write `run_dir/placement.json`, print a line."""
        learner_nodes = ray.get([actor.node_id.remote() for actor in learners])
        rollout_nodes = ray.get([actor.node_id.remote() for actor in rollouts])
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        record = {"placement": self.name, "strategy": self.layout.strategy, "bundles": self.layout.bundles,
                  "learners": learner_nodes, "rollout": rollout_nodes,
                  "node_ips": {node: ips.get(node, "?") for node in {*learner_nodes, *rollout_nodes}}}
        (run_dir / "placement.json").write_text(json.dumps(record, indent=2) + "\n")

        def where(nodes: list[str]) -> str:
            return ", ".join(f"{ips.get(n, '?')}/{n[:8]}" for n in dict.fromkeys(nodes))

        print(f"[assay] placement {self.name}: learners on node {where(learner_nodes)}, "
              f"rollout on node {where(rollout_nodes)}")
        return record

    def remove(self) -> None:
        """Release the reserved resources (the actors must be gone or going)."""
        remove_placement_group(self.group)


def place(cfg: AssayConfig) -> Placement:
    """Reserve the RL stage's placement group (Ray must be initialised) and return where each actor goes.

    Raises `RuntimeError` naming `cluster.placement`, the bundles and the cluster's nodes when Ray
    cannot reserve them within `cluster.placement_timeout_s`.
    """
    name, learners, rollouts = cfg.cluster.placement, cfg.cluster.learners, cfg.rollout.num_workers
    layout = LAYOUTS[name](learners, rollouts, cfg.rollout.gpus_per_worker)
    group = placement_group(layout.bundles, strategy=layout.strategy, name=f"assay-{cfg.name}-{cfg.stage}")
    if not group.wait(cfg.cluster.placement_timeout_s):
        remove_placement_group(group)
        raise RuntimeError(
            f"cluster.placement={name}: Ray could not reserve bundles {layout.bundles} ({layout.strategy}"
            f"{': each bundle on a different node' if layout.strategy == 'STRICT_SPREAD' else ': all on one node'}) "
            f"for {learners} learner(s) and {rollouts} rollout actor(s) within cluster.placement_timeout_s="
            f"{cfg.cluster.placement_timeout_s:g} s; the cluster's nodes: {_describe_nodes()}"
        )

    def options(bundle: int) -> dict[str, Any]:
        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle)
        return {"scheduling_strategy": strategy}

    return Placement(name, layout, group, [options(b) for b in layout.learner_bundles],
                     [options(b) for b in layout.rollout_bundles])


def _describe_nodes() -> str:
    alive = [node for node in ray.nodes() if node["Alive"]]
    parts = [
        f"{node['NodeManagerAddress']}/{node['NodeID'][:8]} "
        + "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(node["Resources"].items()) if k in ("CPU", "GPU")) + "}"
        for node in alive
    ]
    return f"{len(alive)} alive [" + "; ".join(parts) + "]"
