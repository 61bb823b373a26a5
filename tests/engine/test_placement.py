"""engine.placement: the layouts' bundles, a clear failure when `split` has one node, and a real RL run
on a 2-node Ray cluster (simulated on this machine, loopback only) with learners and rollout apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.layouts import colocated, split

ROOT = Path(__file__).resolve().parents[2]


def test_colocated_is_one_bundle_per_actor_packed_on_one_node() -> None:
    layout = colocated(learners=2, rollouts=1, rollout_gpus=0.5)
    assert layout.strategy == "STRICT_PACK"
    assert layout.bundles == [{"CPU": 1}, {"CPU": 1}, {"CPU": 1, "GPU": 0.5}]
    assert (layout.learner_bundles, layout.rollout_bundles) == ([0, 1], [2])


def test_split_is_two_bundles_on_different_nodes() -> None:
    layout = split(learners=2, rollouts=3, rollout_gpus=0.0)
    assert layout.strategy == "STRICT_SPREAD"
    assert layout.bundles == [{"CPU": 2}, {"CPU": 3}]  # no zero-valued GPU entry: Ray rejects it
    assert (layout.learner_bundles, layout.rollout_bundles) == ([0, 0], [1, 1, 1])
    assert split(1, 2, 0.5).bundles[1] == {"CPU": 2, "GPU": 1.0}  # 2 actors x 0.5 GPU


def _unremoved_groups() -> list[str]:
    """Ids of this session's RL-stage placement groups (`place` names them) still reserved or pending."""
    from ray.util import placement_group_table

    return [pg_id for pg_id, pg in placement_group_table().items()
            if pg["name"] == "assay-default-rl" and pg["state"] != "REMOVED"]


@pytest.mark.ray
def test_split_on_one_node_fails_clearly_and_leaves_nothing_reserved(ray_local) -> None:
    from engine.config import compose_config
    from engine.placement import place

    cfg = compose_config(["stage=rl", "cluster.placement=split", "cluster.placement_timeout_s=1"])
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        place(cfg)
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "cluster.placement=split" in message and "STRICT_SPREAD" in message
    assert "[{'CPU': 1}, {'CPU': 1}]" in message  # what it asked for: 1 learner, 1 rollout actor
    assert "1 alive [127.0.0.1/" in message and "CPU: 4" in message  # what there is: ray_local's node
    assert not _unremoved_groups()


@pytest.mark.ray
def test_colocated_reserves_every_bundle_on_one_node(ray_local) -> None:
    from ray.util import placement_group_table

    from engine.config import compose_config
    from engine.placement import place

    placement = place(compose_config(["stage=rl", "cluster.learners=2", "learner.batch_size=4",
                                      "learner.micro_batch_size=2", "cluster.placement_timeout_s=10"]))
    try:
        nodes = placement_group_table(placement.group)["bundles_to_node_id"]
        assert len(nodes) == 3 and len(set(nodes.values())) == 1  # 2 learners + 1 rollout actor, one node
        assert len(placement.learner_options) == 2 and len(placement.rollout_options) == 1
    finally:
        placement.remove()
    assert not _unremoved_groups()


@pytest.fixture
def tiny_model(tmp_path: Path) -> str:
    """The tiny Llama of tests/engine/test_rl_loop.py (initializer_range 0.3: varied sample lengths)."""
    from engine.models import ModelConfig, prepare_model_dir

    corpus = [f"What is {i}+{i}?\nAnswer: {2 * i}" for i in range(40)]
    return str(prepare_model_dir(ModelConfig(initializer_range=0.3), corpus, tmp_path / "tiny"))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_split_on_two_nodes_runs_rl_with_weights_synced_across_nodes(tiny_model: str, tmp_path: Path) -> None:
    # Two Ray nodes on this machine (as `ray start --head` plus `ray start --address=...` would make),
    # then `assay train cluster.address=... cluster.placement=split`; the test process stays off both.
    from ray.cluster_utils import Cluster

    from engine.metrics import read_metrics
    from tests.engine.test_rl_loop import _file_run_args

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?\n", "answer": str(2 * i),
                                          "response": f"Answer: {2 * i}"}) + "\n"
                               for i in range(40)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        args = [*_file_run_args(prompts, tiny_model, tmp_path, "EvenLengthVerifier"), "steps=2",
                "rollout.weight_sync=ray", "cluster.placement=split", "cluster.placement_timeout_s=60",
                f"cluster.address={cluster.address}"]
        proc = subprocess.run([sys.executable, "-m", "engine.cli", "train", *args], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=600, env={**os.environ})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run_dir = tmp_path / "default" / "rl"
        where = json.loads((run_dir / "placement.json").read_text())
        head = cluster.head_node.node_id
        assert where["placement"] == "split" and where["strategy"] == "STRICT_SPREAD"
        assert {*where["learners"], *where["rollout"]} == {head, worker.node_id}  # both nodes used...
        assert len(set(where["learners"])) == len(set(where["rollout"])) == 1
        assert set(where["learners"]).isdisjoint(where["rollout"])  # ...by different roles
        assert "[assay] placement split: learners on node 127.0.0.1/" in proc.stdout
        steps: dict[int, dict[str, float]] = {}
        for record in read_metrics(run_dir / "metrics.jsonl"):
            steps.setdefault(record["step"], {}).update(record)
        assert sorted(steps) == [0, 1, 2]
        for step in (1, 2):  # the policy moved, and the rollout node loaded each step's weights
            assert steps[step]["learner/grad_norm"] > 0
            assert steps[step]["rollout/weight_version"] == step
            assert steps[step]["perf/weight_bytes"] > 0
    finally:
        cluster.shutdown()
