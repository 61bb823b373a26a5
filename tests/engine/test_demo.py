"""`assay demo` wired end to end (every stage for 2 steps), and stopping a supervised stage early.

The demo's numbers come from the full run (docs/demo.md); this
guards its plumbing: four stages in order, the flawed-teacher SFT starting from the clean SFT's
export, and `report.json` shaped as documented.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import compose_config
from engine.metrics import read_metrics
from tests.engine.plugins import PATH as PLUGINS

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.vllm
def test_demo_runs_every_stage_and_writes_the_report(ray_local, tmp_path: Path, capsys) -> None:
    from engine.cli import DEMO_STAGES, main

    assert main(["demo", f"runs_dir={tmp_path}", "steps=2", "progress=false", "rl.prompts_per_step=16",
                 "task.eval_size=8", "rollout.kv_cache_gib=0.5", "corpus_docs=500"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert list(report["stages"]) == ["pretrain", "sft_clean", "sft", "rl"] == [
        dict(arg.split("=", 1) for arg in overrides if "=" in arg).get("stage_dir", stage)
        for stage, overrides in DEMO_STAGES]
    for name, stage in report["stages"].items():
        assert 0.0 <= stage["accuracy"] <= 1.0 and 0.0 <= stage["sampled_accuracy"] <= 1.0, name
        assert stage["seconds"] > 0, name
    assert report["total_seconds"] == pytest.approx(sum(s["seconds"] for s in report["stages"].values()))
    assert (tmp_path / "demo" / "report.png").stat().st_size > 0
    # The flawed-teacher SFT continues the clean SFT; RL continues the flawed-teacher SFT.
    sft_config = (tmp_path / "demo" / "sft" / "config.yaml").read_text()
    assert "init_from: sft_clean" in sft_config and "teacher_accuracy: 0.4" in sft_config
    assert "starts from this run's sft export" in out
    for stage in report["stages"]:
        assert (tmp_path / "demo" / stage / "final" / "hf" / "config.json").exists()

    # Run again: `resume=true` finds every stage finished and trains nothing; without it the earlier run
    # is moved aside (here the new run then stops at a bad model path, before any stage starts).
    args = [f"runs_dir={tmp_path}", "steps=2", "progress=false", "task.eval_size=8", "corpus_docs=500"]
    assert main(["demo", *args, "resume=true"]) == 0
    assert capsys.readouterr().out.count("already; nothing to resume") == 4
    assert main(["demo", *args, f"model.path={tmp_path}/no-model"]) == 1
    out, err = capsys.readouterr()
    (aside,) = tmp_path.glob("demo.old-*")
    assert f"moved the earlier demo run aside to {aside}" in out and "no-model" in err
    assert json.loads((aside / "report.json").read_text())["stages"].keys() == report["stages"].keys()


@pytest.mark.vllm
def test_the_preference_demo_trains_a_reward_model_dpo_and_rl_against_the_reward_model(ray_local, tmp_path: Path) -> None:
    from engine.cli import main

    assert main(["demo", "experiment=preference", f"runs_dir={tmp_path}", "steps=2", "progress=false",
                 "rl.prompts_per_step=16", "task.eval_size=8", "task.pairs.size=32", "rollout.kv_cache_gib=0.5",
                 "corpus_docs=500"]) == 0
    run = tmp_path / "preference"
    report = json.loads((run / "report.json").read_text())["stages"]
    assert list(report) == ["pretrain", "sft_clean", "sft", "rm", "dpo", "rl_rm"]
    assert 0.0 <= report["rm"]["pair_accuracy"] <= 1.0 and 0.0 <= report["dpo"]["pair_accuracy"] <= 1.0
    # DPO, the reward model and RL all start from the flawed teacher's SFT export
    for stage in ("rm", "dpo", "rl_rm"):
        assert "init_from: sft" in (run / stage / "config.yaml").read_text().splitlines(), stage
    rl = [r for r in read_metrics(run / "rl_rm" / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert rl and all(0.0 < r["reward/reward_model"] < 1.0 and 0.0 <= r["reward/math"] <= 1.0 for r in rl)
    # the reward is the reward model's score alone (the math verifier only watches, at weight 0)
    assert all(r["rollout/reward_mean"] == pytest.approx(r["reward/reward_model"], abs=1e-5) for r in rl)


def test_stop_at_accuracy_ends_a_supervised_stage_at_the_evaluation_that_reaches_it(ray_local, tmp_path) -> None:
    from engine.checkpoint import read_state
    from engine.supervised import run_stage

    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?\n", "answer": str(i + 1),
                                        "response": f"Answer: {i + 1}"}) + "\n" for i in range(40)))
    cfg = compose_config(["experiment=arith_tiny", "stage=sft", "steps=50", "eval_every=3", "stop_at_accuracy=0.5",
                          "progress=false", f"runs_dir={tmp_path}", "task=file", f"task.file.path={data}",
                          f"task.file.verifier={PLUGINS}:AlwaysRight", "task.eval_size=4", "corpus_docs=40",
                          "learner.batch_size=8", "learner.micro_batch_size=8"])
    result = run_stage(cfg)
    assert result.steps == 3
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3] and records[2]["eval/accuracy"] == 1.0
    # the stage's final evaluation: greedy and sampled accuracy (8 samples per task, arith_tiny's rollout.n)
    assert records[-1]["eval/accuracy"] == records[-1]["eval/pass@1"] == 1.0 and records[-1]["eval/G"] == 8
    assert read_state(result.run_dir / "final")["step"] == 3
    assert (result.export_dir / "config.json").exists()
