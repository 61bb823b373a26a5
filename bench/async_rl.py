"""RL step time, synchronous vs async rollout (`rl.max_staleness`), on the same experiment, in one run.

The demo's RL stage (configs/experiment/demo.yaml: 64 prompts x 8 samples of 2-digit addition, the 1 M
parameter Llama, vLLM rollout, one learner) run three ways from the same starting checkpoint:

- `sync`: `rl.max_staleness=0`, the default: rollout, then update, then the next rollout; learner and
  rollout actor take turns, so each gets both cores (`threads` 2 each, the demo's setting).
- `async`: `rl.max_staleness=1 learner.tis_cap=2`: the rollout of step j + 1 runs while step j trains
  (samples one weight version old, importance-corrected); same threads (2 + 2 on 2 cores).
- `async-1+1`: the same with one thread each, so the two overlapping phases do not oversubscribe.

The time of a step is wall time from the end of the previous step to the end of this one
(`perf/step_s`); the first step (start-up, no overlap yet) and the last (it runs the final held-out
evaluation) are left out and the median of the rest is reported, with the ratio to `sync`. Without
`--model` the starting checkpoint is the demo's pretraining stage cut short (`--pretrain-steps`), which
already writes well-formed `\\boxed{...}` answers of realistic length.

    python bench/async_rl.py [--steps 10] [--model HF_DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.ray_cluster import set_process_env

set_process_env()

SETUPS: dict[str, list[str]] = {
    "sync": ["rl.max_staleness=0"],
    "async": ["rl.max_staleness=1", "learner.tis_cap=2.0"],
    "async-1+1": ["rl.max_staleness=1", "learner.tis_cap=2.0", "learner.threads=1", "rollout.threads=1"],
}


def run(overrides: list[str]) -> list[dict[str, Any]]:
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    result = run_stage(compose_config(["experiment=demo", "progress=false", *overrides]))
    return [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["step"] > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="RL steps per setup (first and last not timed)")
    parser.add_argument("--model", help="start every setup from this HF checkpoint directory")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="without --model: pretraining steps")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            run([f"runs_dir={tmp}", "stage=pretrain", f"steps={args.pretrain_steps}", "learner.lr=2e-3",
                 "learner.batch_size=32", "learner.micro_batch_size=16", "learner.warmup_steps=20"])
            model = str(Path(tmp) / "demo" / "pretrain" / "final" / "hf")
        results: dict[str, Any] = {}
        for name, overrides in SETUPS.items():
            records = run([f"runs_dir={tmp}/{name}", "stage=rl", f"steps={args.steps}", f"model.path={model}",
                           "eval_every=0", *overrides])
            timed = [r["perf/step_s"] for r in records[1:-1]]
            results[name] = {
                "step_s_median": statistics.median(timed), "step_s": timed,
                "learn_s_median": statistics.median(r["perf/learn_s"] for r in records[1:-1]),
                "wait_s_median": statistics.median(r["perf/wait_s"] for r in records[1:-1]),
                "staleness_mean": statistics.mean(r["rollout/staleness_mean"] for r in records),
                "reward_last": records[-1]["rollout/reward_mean"],
            }
            print(f"[bench] {name}: median step {results[name]['step_s_median']:.2f} s", flush=True)
    base = results["sync"]["step_s_median"]
    print(f"\n{'setup':<11} {'step s':>7} {'vs sync':>8} {'wait s':>7} {'learn s':>8} {'staleness':>9}")
    for name, r in results.items():
        print(f"{name:<11} {r['step_s_median']:>7.2f} {base / r['step_s_median']:>7.2f}x "
              f"{r['wait_s_median']:>7.2f} {r['learn_s_median']:>8.2f} {r['staleness_mean']:>9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
