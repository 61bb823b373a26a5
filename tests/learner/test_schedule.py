"""Warmup + cosine learning-rate schedule against hand-derived numbers."""

from __future__ import annotations

import pytest
import torch

from learner.schedule import build_scheduler, lr_factor


def test_warmup_then_cosine_hand_derived() -> None:
    # warmup 4, total 14 -> 10 decay steps, floor 0.1: f = 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 4) / 10))
    def f(step: int) -> float:
        return lr_factor(step, warmup_steps=4, total_steps=14, schedule="cosine", min_lr_ratio=0.1)

    assert f(0) == pytest.approx(0.25)  # (0 + 1) / 4
    assert f(2) == pytest.approx(0.75)  # (2 + 1) / 4
    assert f(3) == pytest.approx(1.0)  # last warmup step reaches the peak
    assert f(4) == pytest.approx(1.0)  # cos(0) = 1
    assert f(9) == pytest.approx(0.55)  # cos(pi / 2) = 0 -> 0.1 + 0.45
    assert f(14) == pytest.approx(0.1)  # cos(pi) = -1 -> floor
    assert f(30) == pytest.approx(0.1)  # past the end: stays at the floor


def test_constant_after_warmup_and_no_warmup() -> None:
    assert lr_factor(1, 2, 10, "constant", 0.1) == pytest.approx(1.0)  # (1 + 1) / 2
    assert lr_factor(9, 2, 10, "constant", 0.1) == pytest.approx(1.0)
    # no warmup: step 0 is the cosine start
    assert lr_factor(0, 0, 10, "cosine", 0.0) == pytest.approx(1.0)
    # step 5 of 10 with floor 0: 0.5 * (1 + cos(pi / 2)) = 0.5
    assert lr_factor(5, 0, 10, "cosine", 0.0) == pytest.approx(0.5)


def test_unknown_schedule_is_an_error() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(5, 0, 10, "linear", 0.0)


def test_scheduler_drives_optimizer_lr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=4, schedule="cosine", min_lr_ratio=0.0)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # 2 * [1/2, 2/2, 0.5 * (1 + cos 0), 0.5 * (1 + cos(pi / 2))] = [1, 2, 2, 1]
    assert seen == pytest.approx([1.0, 2.0, 2.0, 1.0])
