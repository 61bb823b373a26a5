"""The learner's structured config: the one place its defaults live.

Hydra composes `LearnerConfig` from these dataclass defaults plus YAML overrides; the engine converts
it to this dataclass at the entry point, so nothing downstream reads a default from anywhere else.
Only OmegaConf-supported field types are used (no unions, tuples of mixed types or callables).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class LearnerConfig:
    """DeepSpeed learner settings shared by supervised (pretrain / SFT) and RL modes."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients),
    3 (+ parameters)."""

    precision: str = "fp32"
    """`fp32`, or `bf16` (bf16 weights and activations with fp32 master weights in the optimizer)."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to every parameter."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""

    eps: float = 1e-8
    """AdamW epsilon."""

    warmup_steps: int = 0
    """Optimizer steps of linear warmup: step s (0-based) uses lr * (s + 1) / warmup_steps."""

    lr_schedule: str = "cosine"
    """After warmup: `cosine` decay from lr to lr * min_lr_ratio over the remaining steps, or
    `constant`."""

    min_lr_ratio: float = 0.1
    """Floor of the cosine decay, as a fraction of lr."""

    batch_size: int = 8
    """Sequences per optimizer step, across all learner ranks (the global batch)."""

    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank. Gradient accumulation steps =
    batch_size / (micro_batch_size * world_size), which must be a positive integer."""

    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""

    seed: int = 0
    """Seed of torch's RNG on every learner rank (offset by rank)."""

    loss: str = "nll"
    """Key into `learner.algos.LOSSES`."""


def gradient_accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """batch_size / (micro_batch_size * world_size), or a ValueError naming the fields."""
    if batch_size <= 0 or micro_batch_size <= 0 or world_size <= 0:
        raise ValueError(
            f"LearnerConfig: batch_size ({batch_size}), micro_batch_size ({micro_batch_size}) and the "
            f"learner world_size ({world_size}) must all be positive"
        )
    per_step = micro_batch_size * world_size
    if batch_size % per_step != 0:
        raise ValueError(
            f"LearnerConfig: batch_size ({batch_size}) must be a multiple of micro_batch_size "
            f"({micro_batch_size}) x learner world_size ({world_size}) = {per_step}, so that gradient "
            f"accumulation steps = batch_size / (micro_batch_size x world_size) is a positive integer"
        )
    return batch_size // per_step


def validate(cfg: LearnerConfig, world_size: int) -> int:
    """Check the choices in `cfg`; return the gradient accumulation steps for `world_size` ranks."""
    if cfg.zero_stage not in ZERO_STAGES:
        raise ValueError(f"LearnerConfig.zero_stage: expected one of {ZERO_STAGES}, got {cfg.zero_stage!r}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"LearnerConfig.precision: expected one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"LearnerConfig.lr_schedule: expected one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}"
        )
    if len(cfg.betas) != 2:
        raise ValueError(f"LearnerConfig.betas: expected two numbers [beta1, beta2], got {list(cfg.betas)!r}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"LearnerConfig.min_lr_ratio: expected a value in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"LearnerConfig.warmup_steps: expected >= 0, got {cfg.warmup_steps}")
    return gradient_accumulation_steps(cfg.batch_size, cfg.micro_batch_size, world_size)
