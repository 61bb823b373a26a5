"""The end-of-run report: the curves people would rather see than read, as one PNG plus a summary."""

from __future__ import annotations

from pathlib import Path

from engine.metrics import read_metrics


def write_report(out_dir: Path, stage_dirs: list[Path]) -> Path:
    """Plot training loss and held-out accuracy of each stage in order; return the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    summary = []
    for stage_dir in stage_dirs:
        records = read_metrics(stage_dir / "metrics.jsonl")
        loss = [(r["step"] + offset, r["learner/loss"]) for r in records if "learner/nll_sum" in r]  # NLL stages
        reward = [(r["step"] + offset, r["rollout/reward_mean"]) for r in records if "rollout/reward_mean" in r]
        acc = [(r["step"] + offset, r.get("eval/accuracy", r.get("eval/pass@1"))) for r in records
               if "eval/accuracy" in r or "eval/pass@1" in r]
        if loss:
            ax_loss.plot(*zip(*loss), label=stage_dir.name)
        if reward:
            ax_acc.plot(*zip(*reward), alpha=0.5, label=f"{stage_dir.name} train reward")
        if acc:
            ax_acc.plot(*zip(*acc), marker="o", label=f"{stage_dir.name} held-out")
            final_loss = f"final loss {loss[-1][1]:.3f}, " if loss else ""
            summary.append(f"{stage_dir.name}: {final_loss}held-out accuracy {acc[-1][1]:.3f}"
                           + (f" (first {acc[0][1]:.3f})" if len(acc) > 1 else ""))
        offset += records[-1]["step"] if records else 0
    ax_loss.set(title="training loss (NLL)", xlabel="step (stages back to back)", yscale="log")
    ax_acc.set(title="held-out accuracy (SFT: greedy; RL: pass@1) and RL reward", xlabel="step", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    (out_dir / "report.txt").write_text("\n".join(summary) + "\n")
    for line in summary:
        print(f"[assay] {line}")
    return path
