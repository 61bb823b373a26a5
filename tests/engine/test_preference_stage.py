"""`stage=dpo` end to end: real Ray actors, real DeepSpeed, the tiny model, generated arithmetic pairs.

A straight 4-step run against the same run resumed from its step-2 checkpoint (with the reference
log-probabilities file removed, so the resumed run scores the reference again before it loads the
checkpoint): the losses of steps 3 and 4 must agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.config import ConfigError, compose_config
from engine.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ARGS = ["stage=dpo", "task=arithmetic_pairs", "task.arithmetic.digits=2", "task.arithmetic.operators=+",
        "task.pairs.size=64", "task.eval_size=16", "corpus_docs=400", "steps=4", "eval_every=2", "save_every=2",
        "learner.batch_size=8", "learner.micro_batch_size=4", "learner.lr=1e-3", "progress=false", "rollout.n=2"]


def _by_step(path: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(path) if key in r}


def test_dpo_trains_evaluates_and_resumes_exactly(ray_local: Any, tmp_path: Path) -> None:
    from engine.supervised import run_stage

    first = run_stage(compose_config([*ARGS, f"runs_dir={tmp_path}"]))
    metrics = first.run_dir / "metrics.jsonl"
    straight = _by_step(metrics, "learner/loss")
    assert sorted(straight) == [1, 2, 3, 4]
    # Step 1 trains from the reference itself: every log-ratio is 0, so the DPO loss is log 2.
    assert straight[1] == pytest.approx(0.6931472, abs=1e-5)
    last = read_metrics(metrics)[-1]
    assert {"eval/preference_accuracy", "eval/reward_margin", "eval/accuracy", "eval/pass@G"} <= set(last)
    assert (first.export_dir / "config.json").is_file() and (first.run_dir / "reference_logps.pt").is_file()

    # Resume from step 2 as if the run had died after that checkpoint.
    shutil.rmtree(first.run_dir / "final")
    shutil.rmtree(first.run_dir / "checkpoints" / "step_000004", ignore_errors=True)
    (first.run_dir / "reference_logps.pt").unlink()
    run_stage(compose_config([*ARGS, f"runs_dir={tmp_path}", "resume=true"]))
    resumed = _by_step(metrics, "learner/loss")  # the later rows of a step win
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_dpo_refuses_a_source_without_pairs_before_writing(tmp_path: Path) -> None:
    from engine.supervised import run_stage

    with pytest.raises(ConfigError, match="task=pairs"):
        run_stage(compose_config(["stage=dpo", "task=arithmetic", f"runs_dir={tmp_path}", "corpus_docs=200"]))
    assert not (tmp_path / "default" / "dpo").exists()


def test_rm_trains_a_reward_model_that_transformers_loads(ray_local: Any, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from engine.supervised import run_stage

    args = [a for a in ARGS if not a.startswith(("stage=", "save_every="))]
    result = run_stage(compose_config([*args, "stage=rm", f"runs_dir={tmp_path}"]))
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert {"rewards/accuracy", "rewards/margin", "learner/loss"} <= set(rows[0])
    assert {"eval/rm_accuracy", "eval/rm_loss", "eval/reward_margin"} <= set(rows[-1])
    assert "stage: rm" in (result.run_dir / "config.yaml").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(result.export_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7], [5, 6, 0]])).logits.shape == (2, 1)
