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
        loss = [(r["step"] + offset, r["learner/loss"]) for r in records if "learner/loss" in r]
        acc = [(r["step"] + offset, r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
        if loss:
            ax_loss.plot(*zip(*loss), label=stage_dir.name)
        if acc:
            ax_acc.plot(*zip(*acc), marker="o", label=stage_dir.name)
            summary.append(f"{stage_dir.name}: final loss {loss[-1][1]:.3f}, eval accuracy {acc[-1][1]:.3f}")
        offset += records[-1]["step"] if records else 0
    ax_loss.set(title="training loss (NLL)", xlabel="step (stages back to back)", yscale="log")
    ax_acc.set(title="held-out greedy accuracy", xlabel="step", ylim=(0, 1))
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
