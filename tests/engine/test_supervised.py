"""The supervised stages end to end: real Ray actors, real DeepSpeed, the tiny model, the math verifier.

One module-scoped run does pretrain -> SFT on 1-digit arithmetic (the embedded default, shortened);
the tests read its metrics and exports. Resume is checked with the real CLI in subprocesses killed
with SIGKILL, the way a user's run dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import compose_config
from engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

COMMON = ["experiment=arith_tiny", "progress=false"]
PRETRAIN = ["stage=pretrain", "steps=1000", "learner.lr=3e-3", "learner.warmup_steps=30", "eval_every=250"]
SFT = ["stage=sft", "steps=200", "learner.lr=3e-4", "learner.warmup_steps=10", "eval_every=50"]
# Measured here (seed 0): held-out accuracy 0.47 after pretrain, 0.52 after SFT (0.59 at step 150).
ACCURACY_FLOOR = 0.35


@pytest.fixture(scope="module")
def pipeline(ray_local, tmp_path_factory):
    from engine.supervised import run_stage

    runs = tmp_path_factory.mktemp("runs")
    pre = run_stage(compose_config([*COMMON, *PRETRAIN, f"runs_dir={runs}"]))
    sft = run_stage(compose_config([*COMMON, *SFT, f"runs_dir={runs}"]))
    return pre, sft


def test_pretrain_lowers_loss(pipeline) -> None:
    pre, _ = pipeline
    losses = [r["learner/loss"] for r in read_metrics(pre.run_dir / "metrics.jsonl") if "learner/loss" in r]
    assert len(losses) == pre.steps
    # Random init over a ~500-token vocabulary starts near ln(500) ≈ 6.2 nats/token; packed
    # addition documents are mostly predictable text (measured here: 1.02 after 1000 steps), so the
    # loss must fall below a quarter of where it started.
    assert losses[0] > 5.0
    assert losses[-1] < losses[0] / 4


def test_sft_lifts_heldout_accuracy(pipeline) -> None:
    pre, sft = pipeline
    before = read_metrics(pre.run_dir / "metrics.jsonl")[-1]["eval/accuracy"]
    after = read_metrics(sft.run_dir / "metrics.jsonl")[-1]["eval/accuracy"]
    # Floor measured here: see docs/demo.md.
    assert after >= ACCURACY_FLOOR
    assert after > before


def test_exports_load_with_transformers(pipeline) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, sft = pipeline
    model = AutoModelForCausalLM.from_pretrained(sft.export_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft.export_dir)
    ids = tokenizer("What is 3+4?\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    saved = (sft.run_dir / "config.yaml").read_text()
    assert "stage: sft" in saved and "name: arith_tiny" in saved


def _assay(args: list[str], runs: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "train", *args, f"runs_dir={runs}"],
                            cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["learner/loss"] for r in read_metrics(path) if "learner/loss" in r}


def test_kill_or_interrupt_and_resume_reproduces_losses(tmp_path: Path) -> None:
    args = [*COMMON, "stage=pretrain", "steps=8", "save_every=4", "learner.lr=3e-3", "learner.batch_size=8",
            "learner.micro_batch_size=4", "cluster.learners=2"]
    straight = _assay(args, tmp_path / "straight")
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out[-3000:]
    expected = _losses(tmp_path / "straight" / "arith_tiny" / "pretrain" / "metrics.jsonl")
    assert sorted(expected) == list(range(1, 9))

    # The same run, SIGKILLed (with its whole process group, Ray included) once step 4 is saved.
    crashed = _assay(args, tmp_path / "crashed")
    run_dir = tmp_path / "crashed" / "arith_tiny" / "pretrain"
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "step_000004" / "state.json").exists():
        assert crashed.poll() is None, crashed.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(crashed.pid, signal.SIGKILL)
    crashed.wait(timeout=60)

    resumed = _assay([*args, "resume=true"], tmp_path / "crashed")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed" in out and "step_000004" in out
    got = _losses(run_dir / "metrics.jsonl")
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):  # the steps recomputed after the resume
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got[step], expected[step])

    # Ctrl-C, as a terminal sends it (SIGINT to the whole process group, Ray's processes included), with
    # no periodic checkpoint: the run finishes its step, checkpoints it, exits 130 and says how to go on.
    interrupted = _assay([a for a in args if a != "save_every=4"], tmp_path / "interrupted")
    run_dir = tmp_path / "interrupted" / "arith_tiny" / "pretrain"
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics.jsonl").exists() or not _losses(run_dir / "metrics.jsonl"):
        assert interrupted.poll() is None and time.monotonic() < deadline, interrupted.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(interrupted.pid, signal.SIGINT)
    out, _ = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, out[-3000:]
    (line,) = [line for line in out.splitlines() if "stopped at step" in line]
    at = int(line.split("stopped at step ")[1].split()[0])
    assert 1 <= at < 8 and (run_dir / "checkpoints" / f"step_{at:06d}" / "state.json").exists(), line
    assert line.endswith("resume=true") and "Traceback" not in out and "KeyboardInterrupt" not in out
    resumed = _assay([a for a in args if a != "save_every=4"] + ["resume=true"], tmp_path / "interrupted")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    got = _losses(run_dir / "metrics.jsonl")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got[step], expected[step])


def test_cli_config_error_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "train", "learner.lrr=1"], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "learner.lrr" in proc.stderr and "did you mean: learner.lr" in proc.stderr
