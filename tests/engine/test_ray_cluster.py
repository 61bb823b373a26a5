"""Ray start-up: a local instance stays on loopback, and `cluster.address` joins a running cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray]


def test_local_instance_binds_loopback(ray_local) -> None:
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray_local.nodes()} == {"127.0.0.1"}


@pytest.mark.slow
def test_train_joins_existing_cluster(tmp_path: Path) -> None:
    # A cluster started separately (as `ray start --head` would), then `assay train cluster.address=...`.
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False})
    try:
        assert cluster.address.startswith("127.0.0.1:")
        proc = subprocess.run(
            [sys.executable, "-m", "engine.cli", "train", "experiment=arith_tiny", "stage=pretrain", "steps=2",
             "progress=false", "learner.batch_size=4", "learner.micro_batch_size=4",
             f"cluster.address={cluster.address}", f"runs_dir={tmp_path}"],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ},
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        ray_lines = (tmp_path / "arith_tiny" / "pretrain" / "third_party.log").read_text()  # engine.console
        assert "Started a local Ray instance" not in ray_lines  # it joined, it did not start its own
        assert "Connected to Ray cluster" in ray_lines or "Connecting to existing Ray cluster" in ray_lines
        records = read_metrics(tmp_path / "arith_tiny" / "pretrain" / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2, 2]  # step 2 twice: its losses, then the final evaluation
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("cluster", ["ray", "split"])
def test_cluster_runs_go_to_an_absolute_directory_outside_the_job_copy(cluster: str, monkeypatch) -> None:
    # A `ray job submit` job runs in Ray's temporary copy of the working directory: a relative runs_dir
    # would put the run there.
    from engine.config import compose_config

    monkeypatch.delenv("ASSAY_RUNS_DIR", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert compose_config([f"cluster={cluster}"]).runs_dir == "/home/someone/assay-runs"
    monkeypatch.setenv("ASSAY_RUNS_DIR", "/shared/runs")
    cfg = compose_config([f"cluster={cluster}", "experiment=arith_tiny"])
    assert cfg.runs_dir == "/shared/runs" and cfg.cluster.address == "auto"
    assert compose_config([f"cluster={cluster}", "runs_dir=/elsewhere"]).runs_dir == "/elsewhere"
    assert compose_config([]).runs_dir == "runs"  # the local default is unchanged
