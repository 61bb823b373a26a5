"""LearnerConfig: structured-config compatibility and batch-geometry validation."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from learner.config import LearnerConfig, gradient_accumulation_steps, validate


def test_gradient_accumulation_steps() -> None:
    assert gradient_accumulation_steps(batch_size=8, micro_batch_size=2, world_size=2) == 2  # 8 / (2 * 2)
    assert gradient_accumulation_steps(batch_size=4, micro_batch_size=4, world_size=1) == 1


@pytest.mark.parametrize(("batch", "micro", "world"), [(8, 3, 1), (8, 4, 4), (6, 4, 1)])
def test_uneven_geometry_names_the_fields(batch: int, micro: int, world: int) -> None:
    with pytest.raises(ValueError, match=r"batch_size.*micro_batch_size.*world_size"):
        gradient_accumulation_steps(batch, micro, world)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"zero_stage": 4}, "zero_stage"),
        ({"precision": "fp16"}, "precision"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"preference_loss": "kto"}, "preference_loss"),
        ({"preference_beta": 0.0}, "preference_beta"),
        ({"preference_label_smoothing": 0.5}, "preference_label_smoothing"),
        ({"preference_nll_coef": -1.0}, "preference_nll_coef"),
    ],
)
def test_validate_rejects_bad_choices(override: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"LearnerConfig.{field}"):
        validate(LearnerConfig(**override), world_size=1)


def test_structured_config_round_trip() -> None:
    base = OmegaConf.structured(LearnerConfig)
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(["zero_stage=3", "betas=[0.9,0.99]", "lr=1e-3"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, LearnerConfig)
    assert (cfg.zero_stage, list(cfg.betas), cfg.lr) == (3, [0.9, 0.99], 1e-3)
    assert validate(cfg, world_size=2) == 1  # defaults: 8 / (4 * 2)
