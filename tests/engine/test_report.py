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


def test_preference_stages_report_pair_accuracy_and_each_reward_term(tmp_path: Path) -> None:
    rm = _stage(tmp_path, "rm", [{"step": 1, "learner/loss": 0.7}, {"step": 2, "eval/rm_accuracy": 0.9}])
    dpo = _stage(tmp_path, "dpo", [{"step": 1, "learner/loss": 0.69},
                                   {"step": 2, "eval/preference_accuracy": 0.8, "eval/accuracy": 0.45}])
    rl = _stage(tmp_path, "rl_rm", [{"step": 1, "rollout/reward_mean": 0.6, "reward/reward_model": 0.6, "reward/math": 0.4},
                                    {"step": 2, "rollout/reward_mean": 0.7, "reward/reward_model": 0.7, "reward/math": 0.3,
                                     "eval/accuracy": 0.35}])
    write_report(tmp_path, [(rm, 10.0), (dpo, 20.0), (rl, 30.0)])
    report = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert report["rm"] == {"accuracy": None, "sampled_accuracy": None, "seconds": 10.0, "pair_accuracy": 0.9}
    assert report["dpo"]["pair_accuracy"] == 0.8 and report["dpo"]["accuracy"] == 0.45
    assert "pair_accuracy" not in report["rl_rm"]
    assert "rm: held-out pair accuracy 0.900" in (tmp_path / "report.txt").read_text()
