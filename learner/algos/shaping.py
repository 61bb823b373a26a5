"""Reward shaping and group filtering of DAPO (Yu et al. 2025), as pure functions on reward tensors.

- `overlong_penalty`: the soft overlong punishment. A response of L tokens with a budget of
  `max_len` and a buffer of `buffer` tokens gets 0 while L <= max_len - buffer, then a penalty that
  grows linearly to `-factor` at L = max_len (a response cut at max_len gets the whole `-factor`).
- `informative_groups`: the dynamic-sampling filter. A group whose judged rewards are all equal has
  zero advantage for every sample under any group baseline, so it adds no gradient, only noise in
  the batch size; DAPO drops such groups and samples more prompts instead.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """Penalties (same shape as `lengths`, <= 0) for responses of `lengths` tokens; 0 everywhere when
    `buffer` is 0."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    if buffer > max_len:
        raise ValueError(f"overlong buffer ({buffer}) must not exceed the maximum length ({max_len})")
    over = (lengths.float() - (max_len - buffer)).clamp(min=0.0) / buffer  # 0 .. 1 inside the buffer
    return -factor * over.clamp(max=1.0)


def informative_groups(rewards: Tensor) -> Tensor:
    """`(P,)` bool: the groups of `rewards` `(P, G)` whose judged (non-NaN) rewards are not all equal."""
    judged = ~torch.isnan(rewards)
    high = torch.where(judged, rewards, torch.full_like(rewards, -torch.inf)).amax(1)
    low = torch.where(judged, rewards, torch.full_like(rewards, torch.inf)).amin(1)
    return (judged.sum(1) >= 2) & (high > low)
