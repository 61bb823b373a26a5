"""`LearnerGroup`: W `LearnerActor`s forming one torch.distributed / DeepSpeed data-parallel group.

The driver-facing learner. It owns the two things no single rank can know: how the global batch is
split (contiguous row shards, one per rank, which partition the rows) and the global loss-token
count every rank must normalise by. Metrics come back per rank and are combined here: the loss
metrics are each rank's share of the global sums (already divided by the global token count), so
they add; the optimizer's own numbers (grad norm, lr, step) are identical on every rank.

RL (`train_rl_step`): the global batch of P x G sequences is cut into minibatches of `batch_size`
consecutive rows (one optimizer step each); rank r gets the r-th contiguous chunk of every
minibatch, so its rows arrive in minibatch order and one remote call per rank runs the whole step
(old/ref logprobs and all `ppo_epochs` sweeps) while DeepSpeed's collectives keep the ranks in step.
The driver computes each minibatch's global `num_tokens` / `num_seqs` before sharding, and
(`plan_rl_step`, with `LearnerConfig.skip_zero_advantage`) leaves out the rows whose advantages are
all 0, which add nothing to the gradient, padding every rank to the same number of micro-batches.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from typing import Any

import ray
import torch
from torch import Tensor

from learner.actor import LearnerActor
from learner.config import LearnerConfig, skips_zero_advantage, validate

# Tensors a training batch must hold (the same tuple as `learner.worker.BATCH_KEYS`, repeated so that
# the driver does not import DeepSpeed).
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
# Metrics every rank reports identically; taken from rank 0 instead of summed.
SAME_ON_EVERY_RANK = ("learner/grad_norm", "learner/lr", "learner/step", "learner/optimizer_steps", "critic/grad_norm",
                      "learner/skipped_rows_frac")
# Tensors an RL batch must hold besides BATCH_KEYS, and those it may hold (`learner.worker.RL_OPTIONAL_KEYS`).
RL_KEYS = ("advantages",)
RL_OPTIONAL_KEYS = ("rollout_logprobs", "old_logprobs", "ref_logprobs", "values", "returns")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 for the group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def combine_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Sum the per-rank shares; keep rank 0's optimizer numbers; recompute throughput."""
    out: dict[str, float] = {}
    for key in per_rank[0]:
        if key in SAME_ON_EVERY_RANK:
            out[key] = per_rank[0][key]
        elif not key.startswith("perf/"):
            out[key] = sum(m[key] for m in per_rank)
    step_s = max(m["perf/learner_step_s"] for m in per_rank)
    out["perf/learner_step_s"] = step_s
    out["perf/learner_tokens_per_s"] = out["learner/seq_tokens"] / step_s
    return out


class LearnerGroup:
    """W learner ranks driven as one: `train_step`, `logprobs`, weights, checkpoints."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: str,
        world_size: int,
        total_steps: int,
        actor_options: list[dict[str, Any]] | None = None,
    ) -> None:
        """`actor_options[r]` is passed to `LearnerActor.options(...)` for rank r (placement-group
        scheduling strategy, num_gpus, resources, ...)."""
        validate(cfg, world_size)
        if actor_options is not None and len(actor_options) != world_size:
            raise ValueError(
                f"LearnerGroup: actor_options has {len(actor_options)} entries, expected {world_size}"
            )
        self.cfg = cfg
        self.world_size = world_size
        port = free_port()
        options = actor_options or [{} for _ in range(world_size)]
        self.actors = [
            LearnerActor.options(**options[rank]).remote(  # type: ignore[attr-defined]
                cfg, model_dir, rank, world_size, total_steps, port
            )
            for rank in range(world_size)
        ]
        ray.get([actor.ready.remote() for actor in self.actors])

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One optimizer step on the global `batch` (rows a multiple of world_size x micro_batch_size)."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"LearnerGroup.train_step: batch lacks {missing}; expected {list(BATCH_KEYS)}")
        check_rows(batch["input_ids"].shape[0], self.world_size, self.cfg.micro_batch_size)
        num_tokens = int(batch["loss_mask"].sum())
        if num_tokens == 0:
            raise ValueError("LearnerGroup.train_step: loss_mask selects no tokens in the whole batch")
        shards = shard_rows({k: batch[k] for k in BATCH_KEYS}, self.world_size)
        refs = [actor.train_step.remote(shard, num_tokens) for actor, shard in zip(self.actors, shards)]
        return combine_metrics(ray.get(refs))

    def train_rl_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One RL step on the global batch of P x G sequences (`LearnerWorker.train_rl_step` says what
        happens on each rank and how the metrics are averaged).

        `batch`: `input_ids` (B, T) long, `attention_mask` (B, T), `loss_mask` (B, T) (1 on response
        tokens), `advantages` (B, T) (0 off the mask), optional `rollout_logprobs` (B, T). B must be a
        multiple of `batch_size`. Runs `ppo_epochs * B / batch_size` optimizer steps.
        """
        required = BATCH_KEYS + RL_KEYS
        missing = [k for k in required if k not in batch]
        if missing:
            raise ValueError(f"LearnerGroup.train_rl_step: batch lacks {missing}; expected {list(required)}")
        cfg = self.cfg
        plan, index, pad = plan_rl_step(batch["advantages"], batch["loss_mask"], cfg.batch_size, self.world_size,
                                        skips_zero_advantage(cfg))
        keys = required + tuple(k for k in RL_OPTIONAL_KEYS if k in batch)
        tensors = {k: batch[k] for k in keys}
        refs = [
            actor.train_rl_step.remote(take_rows(tensors, rows, rows_pad), plan)
            for actor, rows, rows_pad in zip(self.actors, index, pad)
        ]
        return combine_metrics(ray.get(refs))

    def logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-token log-probabilities (B, T) under the current weights; any number of rows."""
        return self._scored(batch, "logprobs")  # type: ignore[return-value]

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`LearnerWorker.prepare` over the whole batch: `old_logprobs` (+ `ref_logprobs` with a reference
        model, `values` with a critic), each (B, T); the driver estimates advantages from them and passes
        them back in the `train_rl_step` batch, which then does not score them again."""
        out: dict[str, Tensor] = {}
        if self.cfg.old_logprobs == "rollout":
            out["old_logprobs"] = batch["rollout_logprobs"].float()  # the workers' prepare skips them
            if not (self.cfg.kl_coef > 0 or self.cfg.kl_reward_coef > 0 or self.cfg.critic.enabled):
                return out  # nothing left for the workers to score
        return out | self._scored(batch, "prepare")  # type: ignore[operator]

    def _scored(self, batch: dict[str, Tensor], method: str) -> Tensor | dict[str, Tensor]:
        """Row shards of `batch` through every rank's `method`, concatenated back in row order."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        rows = input_ids.shape[0]
        pad = -rows % self.world_size
        if pad:  # equal shards keep ZeRO-3's collective forwards in step on every rank
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(pad, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(pad, -1)])
        shards = shard_rows({"input_ids": input_ids, "attention_mask": attention_mask}, self.world_size)
        parts = ray.get([getattr(actor, method).remote(shard) for actor, shard in zip(self.actors, shards)])
        if isinstance(parts[0], dict):
            return {key: torch.cat([p[key] for p in parts])[:rows] for key in parts[0]}
        return torch.cat(parts)[:rows]

    def state_dict_for_rollout(self) -> dict[str, Tensor]:
        """Full weights (HF names, CPU tensors), gathered from every rank and returned by rank 0."""
        return ray.get([actor.state_dict_for_rollout.remote() for actor in self.actors])[0]

    def save(self, directory: str) -> None:
        """DeepSpeed checkpoint in `directory/deepspeed`, HF export in `directory/hf`."""
        ray.get([actor.save.remote(directory) for actor in self.actors])

    def load(self, directory: str) -> None:
        """Restore every rank from `save(directory)` (the same world_size and ZeRO stage)."""
        ray.get([actor.load.remote(directory) for actor in self.actors])

    def shutdown(self) -> None:
        """Kill the actors (their processes, and with them the process group)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
