"""Learning-rate schedule: linear warmup, then cosine decay to a floor (or constant).

A pure function of the step so that it is hand-checkable and so that resuming from a checkpoint
(which restores `LambdaLR`'s step counter) lands on exactly the same value. Warmup counts from
(s + 1) / warmup_steps, not s / warmup_steps, so the first optimizer step is not wasted at lr 0
(as nanoGPT does).
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr_schedule: expected 'cosine' or 'constant', got {schedule!r}")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_lr_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` over `lr_factor`; stepped once per optimizer step."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, schedule, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
