"""Where per-step metrics go: JSONL (the record), TensorBoard (the curves), the console (progress).

Keys carry their owner's prefix (`learner/loss`, `eval/accuracy`, `perf/...`); the sink never
interprets them, so every part logs without knowing who listens.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

# The few keys shown on the progress bar, in this order, when present.
CONSOLE_KEYS = ("learner/loss", "learner/lr", "learner/grad_norm", "eval/accuracy", "perf/learner_tokens_per_s")


class MetricsSink:
    """Appends one JSON line per logged step, mirrors scalars to TensorBoard, drives a tqdm bar."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.writer = _tensorboard_writer(run_dir / "tb") if tensorboard else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=run_dir.name, unit="step",
                        disable=not progress, file=sys.stderr, dynamic_ncols=True)
        if start_step:
            _truncate_after(self.path, start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record: dict[str, Any] = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    self.writer.add_scalar(key, float(value), step)
        shown = {k.split("/", 1)[1]: f"{metrics[k]:.4g}" for k in CONSOLE_KEYS if k in metrics}
        self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The records of a metrics.jsonl file, in order."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    """On resume from a checkpoint taken after `step` steps, drop the records of later steps."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _tensorboard_writer(log_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))
