"""`bench/gpu_smoke.py` end to end on CPU with the tiny model, as the bare GPU box runs it: ray and
vllm blocked in every process (`ASSAY_SMOKE_BARE=1`), so the broadcast uses torch's own group."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_smoke_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    env = os.environ | {"ASSAY_SMOKE_BARE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--params", "tiny", "--device", "cpu",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = {s["section"]: s for s in report["sections"]}
    assert list(sections) == ["model", "learner", "rollout", "broadcast"]
    assert all(s["ok"] for s in sections.values()), [s.get("error") for s in sections.values()]
    assert report["summary"]["all_ok"] and report["device"] == "cpu" and report["wall_s"] > 0

    # tied embedding 512*64 = 32768; per layer q 64*64+64, k and v 64*32+32 each (1 KV head of 32),
    # o 64*64, MLP 3*64*128, two norms 2*64: 37120, x2 layers; final norm 64 -> 107072
    assert sections["model"]["params"] == 32768 + 2 * 37120 + 64
    learner = sections["learner"]
    assert learner["zero_stage"] == 2 and learner["precision"] == "fp32" and learner["mfu"] is None
    assert len(learner["step_s"]) == 3 and min(learner["step_s"]) > 0
    assert all(math.isfinite(x) for x in learner["losses"]) and math.isfinite(learner["rl_loss"])
    assert learner["tokens_per_s"] > 0 and learner["rl_step_s"] > 0
    rollout = sections["rollout"]
    assert rollout["backend_device"] == "cpu" and rollout["rows"] == 2 * 4  # prompts x n
    assert 0 < rollout["tokens"] <= 8 * 16 and rollout["tokens_per_s"] > 0  # max_tokens 16 per row
    assert rollout["weight_version"] == 1  # the learner's weights, loaded before generating
    broadcast = sections["broadcast"]
    assert broadcast["backend"] == "gloo" and broadcast["group"] == "torch"
    assert broadcast["version"] == 3  # one warm-up sync, then 2 timed ones
    assert broadcast["tensors"] == learner["state_tensors"] and broadcast["mb"] == learner["state_mb"]
    assert broadcast["sync_s"] > 0 and broadcast["gb_per_s"] > 0 and broadcast["publish_s"] > 0
