"""The end-of-run report: the curves people would rather see than read (one PNG), a text summary,
and `report.json` for scripts: `{"stages": {name: {"accuracy", "sampled_accuracy", "seconds"}},
"total_seconds"}` (accuracy: greedy exact match on the held-out set, as a fraction; sampled_accuracy:
pass@1, the mean score of G samples at temperature 1, from each stage's final evaluation; a DPO or RM
stage adds `pair_accuracy`, the held-out pairs it ranks right). An RL stage whose reward has several
terms (`verifier.rewards`) plots each term's train score beside the reward: a reward model's rising
while a weight-0 gold verifier's falls is reward over-optimisation."""

from __future__ import annotations

import json
from pathlib import Path

from engine.metrics import read_metrics


def write_report(out_dir: Path, stages: list[tuple[Path, float]]) -> Path:
    """Plot loss, held-out accuracy and reward of each (stage dir, seconds) in order; return the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_rl) = plt.subplots(1, 3, figsize=(16, 4.5))
    offset = 0
    summary = []
    table: dict[str, dict[str, float | None]] = {}
    for stage_dir, seconds in stages:
        records = read_metrics(stage_dir / "metrics.jsonl")
        loss = [(r["step"] + offset, r["learner/loss"]) for r in records if "learner/nll_sum" in r]  # NLL stages
        reward = [(r["step"], r["rollout/reward_mean"]) for r in records if "rollout/reward_mean" in r]
        acc = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
        sampled = [(r["step"], r["eval/pass@1"]) for r in records if "eval/pass@1" in r]
        if loss:
            ax_loss.plot(*zip(*loss), label=stage_dir.name)
        if acc:
            ax_acc.plot(*zip(*[(s + offset, a) for s, a in acc]), marker="o", markersize=3, label=stage_dir.name)
            final_loss = f"final loss {loss[-1][1]:.3f}, " if loss else ""
            summary.append(f"{stage_dir.name}: {final_loss}held-out accuracy {acc[-1][1]:.3f}"
                           + (f" (first {acc[0][1]:.3f})" if len(acc) > 1 else ""))
        if reward:  # an RL stage: its own panel, over its own steps
            ax_rl.plot(*zip(*reward), alpha=0.6, label=f"{stage_dir.name}: train reward")
            for term in sorted({k for r in records for k in r if k.startswith("reward/")}):  # verifier.rewards
                curve = [(r["step"], r[term]) for r in records if term in r]
                ax_rl.plot(*zip(*curve), linestyle=":", label=f"{stage_dir.name}: {term.split('/', 1)[1]} (train)")
            if acc:
                ax_rl.plot(*zip(*acc), marker="o", label=f"{stage_dir.name}: held-out greedy")
            if sampled:
                ax_rl.plot(*zip(*sampled), marker="x", linestyle="--", label=f"{stage_dir.name}: held-out sampled")
        pairs = [r[k] for r in records for k in ("eval/preference_accuracy", "eval/rm_accuracy") if k in r]
        if pairs:
            summary.append(f"{stage_dir.name}: held-out pair accuracy {pairs[-1]:.3f}")
        table[stage_dir.name] = {"accuracy": acc[-1][1] if acc else None,
                                 "sampled_accuracy": sampled[-1][1] if sampled else None, "seconds": seconds,
                                 **({"pair_accuracy": pairs[-1]} if pairs else {})}
        offset += int(records[-1]["step"]) if records else 0
    ax_loss.set(title="training loss (NLL)", xlabel="step (stages back to back)", yscale="log")
    ax_acc.set(title="held-out greedy accuracy", xlabel="step (stages back to back)", ylim=(0, 1.02))
    ax_rl.set(title="RL: reward and held-out accuracy", xlabel="RL step", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc, ax_rl):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    (out_dir / "report.txt").write_text("\n".join(summary) + "\n")
    report = {"stages": table, "total_seconds": sum(seconds for _, seconds in stages)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for line in summary:
        print(f"[assay] {line}")
    return path
