"""How one RL step's rows reach the learner ranks: the step plan, row shards, batch keys.

Pure tensor code (no Ray, no DeepSpeed): `learner.group` plans a step for W ranks before its one
call to them, and `learner.worker` plans it itself when it runs alone (world_size 1).

The global batch of P x G sequences is cut into minibatches of `batch_size` consecutive rows (one
optimizer step each); rank r gets the r-th contiguous chunk of every minibatch, so its rows arrive in
minibatch order. Each minibatch's global `num_tokens` / `num_seqs` are computed here, before
sharding, and (with `LearnerConfig.skip_zero_advantage`) the rows whose advantages are all 0, which
add nothing to the gradient, are left out, every rank padded to the same number of micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Tensors every training batch holds, (B, T) each.
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
# Tensors an RL batch must hold besides BATCH_KEYS, and the per-token ones it may hold.
RL_KEYS = ("advantages",)
RL_OPTIONAL_KEYS = ("rollout_logprobs", "old_logprobs", "ref_logprobs", "values", "returns")
# A preference batch (`learner.preference_step`): BATCH_KEYS per side, and the reference's sequence logps.
SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{side}_{key}" for side in SIDES for key in BATCH_KEYS)
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def check_pairs(batch: dict[str, Tensor], micro_batch_size: int | None = None) -> int:
    """The number of pairs in `batch` after checking its keys and shapes (naming what is wrong)."""
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise ValueError(f"preference batch: missing {missing}; expected keys {list(PAIR_KEYS)}")
    shape = batch["chosen_input_ids"].shape
    wrong = [k for k in PAIR_KEYS if batch[k].shape != shape]
    if len(shape) != 2 or wrong:
        raise ValueError(f"preference batch: every tensor must have chosen_input_ids' (N, T) shape {tuple(shape)}; "
                         f"these do not: {wrong}")
    pairs = shape[0]
    if micro_batch_size is not None and (pairs == 0 or pairs % micro_batch_size):
        raise ValueError(f"preference batch: this rank got {pairs} pairs, which must be a positive multiple of "
                         f"LearnerConfig.micro_batch_size ({micro_batch_size})")
    return pairs


def shard_rows(batch: dict[str, Tensor], world_size: int) -> list[dict[str, Tensor]]:
    """Split every tensor into `world_size` contiguous, equal row shards (rank r gets shard r).

    Shards are copies: a pickled view would ship its whole base tensor to every actor.
    """
    return [{k: v.chunk(world_size)[r].clone() for k, v in batch.items()} for r in range(world_size)]


def check_rows(rows: int, world_size: int, micro_batch_size: int) -> None:
    """A training batch must split into equal per-rank shards of whole micro-batches."""
    per_step = world_size * micro_batch_size
    if rows == 0 or rows % per_step != 0:
        raise ValueError(
            f"LearnerGroup.train_step: the batch has {rows} rows; it must be a positive multiple of "
            f"learner world_size ({world_size}) x LearnerConfig.micro_batch_size ({micro_batch_size}) "
            f"= {per_step}"
        )


def minibatch_normalisers(loss_mask: Tensor, batch_size: int) -> tuple[list[float], list[float]]:
    """Per minibatch of `batch_size` consecutive rows: (loss-token counts, counts of rows with any
    loss token), the global normalisers of `learner.algos.aggregate`.

    A count of 0 (a minibatch without loss tokens, whose loss is 0 anyway) is reported as 1, since the
    aggregation requires positive normalisers.
    """
    rows, seq = loss_mask.shape
    if rows == 0 or rows % batch_size != 0:
        raise ValueError(
            f"LearnerGroup.train_rl_step: the RL batch has {rows} rows; it must be a positive multiple of "
            f"LearnerConfig.batch_size ({batch_size}), the sequences of one minibatch (one optimizer step)"
        )
    selected = (loss_mask != 0).view(rows // batch_size, batch_size, seq)  # (M, batch_size, T)
    num_tokens = selected.sum(dim=(1, 2)).clamp(min=1)  # (M,)
    num_seqs = selected.any(dim=2).sum(dim=1).clamp(min=1)  # (M,)
    return [float(n) for n in num_tokens], [float(n) for n in num_seqs]


def minibatch_rank_rows(rows: int, batch_size: int, world_size: int) -> list[Tensor]:
    """Row indices of each rank: the rank's contiguous chunk of every minibatch, minibatch by minibatch."""
    per_rank = batch_size // world_size
    starts = torch.arange(0, rows, batch_size)  # (M,) first row of each minibatch
    offsets = torch.arange(per_rank)  # (per_rank,)
    return [(starts[:, None] + r * per_rank + offsets[None, :]).reshape(-1) for r in range(world_size)]


@dataclass(frozen=True)
class StepPlan:
    """How one RL step's rows reach the ranks, and what each minibatch is normalised by.

    Per minibatch m: `rows[m]` rows on every rank (the same on every rank, so that every rank runs the
    same number of micro-batches and DeepSpeed's collectives stay in step; with rows left out it need
    not be a multiple of micro_batch_size, and the last micro-batch is then smaller),
    `num_tokens[m]` / `num_seqs[m]` the loss normalisers of ALL its rows, `trained_tokens[m]` the loss tokens of the rows trained (the
    metrics' normaliser; equal to `num_tokens[m]` when nothing is skipped).
    """

    rows: list[int]
    num_tokens: list[float]
    num_seqs: list[float]
    trained_tokens: list[float]
    skipped_rows_frac: float


def plan_rl_step(
    advantages: Tensor,
    loss_mask: Tensor,
    batch_size: int,
    world_size: int,
    skip_zero_advantage: bool,
) -> tuple[StepPlan, list[Tensor], list[Tensor]]:
    """(plan, row index of each rank, padding flags of each rank) for a batch of (B, T) tensors.

    Without skipping, rank r gets the r-th contiguous chunk of every minibatch (`minibatch_rank_rows`).
    With it, the rows of a minibatch whose advantages are 0 on every loss token are left out and the
    rest cut into `world_size` contiguous chunks, each padded to the same length (at least one row:
    the optimizer step of an all-zero minibatch still runs, as AdamW's moments and the schedule would
    have moved). A padding row repeats a row of its minibatch and is flagged: the caller zeroes its
    loss mask and advantages (`take_rows`), so it adds nothing to loss or metrics.
    """
    num_tokens, num_seqs = minibatch_normalisers(loss_mask, batch_size)
    total = loss_mask.shape[0]
    if not skip_zero_advantage:
        index = minibatch_rank_rows(total, batch_size, world_size)
        pad = [torch.zeros(len(i), dtype=torch.bool) for i in index]
        per_rank = [batch_size // world_size] * len(num_tokens)
        return StepPlan(per_rank, num_tokens, num_seqs, num_tokens, 0.0), index, pad
    on_mask = loss_mask != 0  # (B, T)
    live = ((advantages != 0) & on_mask).any(dim=1)  # (B,) rows with any gradient
    index_parts: list[list[Tensor]] = [[] for _ in range(world_size)]
    pad_parts: list[list[Tensor]] = [[] for _ in range(world_size)]
    per_rank, trained = [], []
    for start in range(0, total, batch_size):
        kept = start + torch.nonzero(live[start:start + batch_size]).flatten()  # (k,)
        rows = max(1, math.ceil(len(kept) / world_size))
        per_rank.append(rows)
        trained.append(max(1.0, float(on_mask[kept].sum())))
        for rank in range(world_size):
            mine = kept[rank * rows:(rank + 1) * rows]
            fill = rows - len(mine)
            index_parts[rank].append(torch.cat([mine, torch.full((fill,), start, dtype=torch.long)]))
            pad_parts[rank].append(torch.cat([torch.zeros(len(mine), dtype=torch.bool),
                                              torch.ones(fill, dtype=torch.bool)]))
    index = [torch.cat(parts) for parts in index_parts]
    pad = [torch.cat(parts) for parts in pad_parts]
    skipped = 1.0 - float(live.sum()) / total
    return StepPlan(per_rank, num_tokens, num_seqs, trained, skipped), index, pad


def take_rows(batch: dict[str, Tensor], index: Tensor, pad: Tensor) -> dict[str, Tensor]:
    """The rows `index` of every (B, T) tensor (copies), with padding rows' loss mask and advantages 0."""
    out = {key: value[index] for key, value in batch.items()}
    if bool(pad.any()):
        for key in ("loss_mask", "advantages"):
            if key in out:
                out[key][pad] = 0
    return out
