"""The demo report: the PNG, the text summary and report.json, from hand-written metrics."""

from __future__ import annotations

import json
from pathlib import Path

from engine.report import write_report


def _stage(root: Path, name: str, records: list[dict]) -> Path:
    stage = root / name
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return stage


def test_report_json_and_plot(tmp_path: Path) -> None:
    sft = _stage(tmp_path, "sft", [{"step": 1, "learner/loss": 2.0, "learner/nll_sum": 20.0},
                                   {"step": 2, "learner/loss": 1.0, "learner/nll_sum": 10.0, "eval/accuracy": 0.4}])
    rl = _stage(tmp_path, "rl", [{"step": 0, "eval/accuracy": 0.4, "eval/pass@1": 0.3},
                                 {"step": 1, "learner/loss": -0.1, "rollout/reward_mean": 0.35},
                                 {"step": 2, "rollout/reward_mean": 0.5, "eval/accuracy": 0.6, "eval/pass@1": 0.55}])
    png = write_report(tmp_path, [(sft, 95.0), (rl, 30.5)])
    assert png.exists() and png.stat().st_size > 10_000
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == {"stages": {"sft": {"accuracy": 0.4, "sampled_accuracy": None, "seconds": 95.0},
                                 "rl": {"accuracy": 0.6, "sampled_accuracy": 0.55, "seconds": 30.5}},
                      "total_seconds": 125.5}
    summary = (tmp_path / "report.txt").read_text()
    assert "sft: final loss 1.000, held-out accuracy 0.400" in summary
    assert "rl: held-out accuracy 0.600 (first 0.400)" in summary
