"""`LearnerGroup`: W `LearnerActor`s forming one torch.distributed / DeepSpeed data-parallel group.

The driver-facing learner. It owns the two things no single rank can know: how the global batch is
split (contiguous row shards, one per rank, which partition the rows) and the global loss-token
count every rank must normalise by. Metrics come back per rank and are combined here: the loss
metrics are each rank's share of the global sums (already divided by the global token count), so
they add; the optimizer's own numbers (grad norm, lr, step) are identical on every rank.

RL (`train_rl_step`): the step is planned here (`learner.plan`: minibatches, each rank's rows, the
global normalisers) and one remote call per rank runs the whole step (old/ref logprobs and all
`ppo_epochs` sweeps) while DeepSpeed's collectives keep the ranks in step. With
`train_rl_step_and_publish`, the same call ends with learner rank 0 publishing the new weights
(`attach_weights`), so a default RL step crosses Ray to the learners once: the batch out, the
metrics and a `WeightHandle` back. `prepare` is a second call only when the driver reads what the
learners compute before advantages exist (a KL reward, a critic's values).
"""

from __future__ import annotations

import socket
import warnings
from typing import Any

import ray
import torch
from torch import Tensor

from learner.actor import LearnerActor
from learner.config import LearnerConfig, skips_zero_advantage, validate
from learner.plan import (
    BATCH_KEYS,
    PAIR_KEYS,
    REFERENCE_KEYS,
    RL_KEYS,
    RL_OPTIONAL_KEYS,
    check_pairs,
    check_rows,
    plan_rl_step,
    shard_rows,
    take_rows,
)
from weights import WeightHandle, WeightSpec

# Metrics every rank reports identically; taken from rank 0 instead of summed.
SAME_ON_EVERY_RANK = ("learner/grad_norm", "learner/lr", "learner/step", "learner/optimizer_steps", "critic/grad_norm",
                      "learner/skipped_rows_frac", "perf/weight_publish_s")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 for the group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        return self._rl_step(batch, None)[0]

    def train_rl_step_and_publish(self, batch: dict[str, Tensor], version: int) -> tuple[dict[str, float], WeightHandle]:
        """`train_rl_step`, then learner rank 0 publishes the new weights as `version` in the same call
        (`attach_weights` first; not for a `rendezvous` transport, whose readers must be waiting: use
        `publish_weights` there). Returns the metrics (with `perf/weight_publish_s`) and the handle."""
        metrics, handle = self._rl_step(batch, version)
        assert handle is not None
        return metrics, handle

    def _rl_step(self, batch: dict[str, Tensor], version: int | None) -> tuple[dict[str, float], WeightHandle | None]:
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
            actor.train_rl_step.remote(take_rows(tensors, rows, rows_pad), plan, version)
            for actor, rows, rows_pad in zip(self.actors, index, pad)
        ]
        results = ray.get(refs)
        return combine_metrics([metrics for metrics, _ in results]), results[0][1]

    def train_preference_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One optimizer step on a global batch of (chosen, rejected) pairs (`learner.preference_step` says
        what it holds); pairs a multiple of world_size x micro_batch_size."""
        pairs = check_pairs(batch)
        check_rows(pairs, self.world_size, self.cfg.micro_batch_size)
        num_chosen_tokens = int(batch["chosen_loss_mask"].sum())
        if num_chosen_tokens == 0 or int(batch["rejected_loss_mask"].sum()) == 0:
            raise ValueError("LearnerGroup.train_preference_step: a side's loss_mask selects no tokens in the batch")
        keys = PAIR_KEYS + tuple(k for k in REFERENCE_KEYS if k in batch)
        shards = shard_rows({k: batch[k] for k in keys}, self.world_size)
        refs = [actor.train_preference_step.remote(shard, pairs, num_chosen_tokens)
                for actor, shard in zip(self.actors, shards)]
        return combine_metrics(ray.get(refs))

    def train_reward_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One reward-model optimizer step (`head=reward`, `learner.reward_step`) on a global batch of pairs,
        with an optional per-pair `margin`."""
        pairs = check_pairs(batch)
        check_rows(pairs, self.world_size, self.cfg.micro_batch_size)
        keys = PAIR_KEYS + (("margin",) if "margin" in batch else ())
        shards = shard_rows({k: batch[k] for k in keys}, self.world_size)
        return combine_metrics(ray.get([actor.train_reward_step.remote(shard, pairs)
                                        for actor, shard in zip(self.actors, shards)]))

    def pair_rewards(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The reward model's `chosen` and `rejected` rewards, (N,) each; any number of pairs."""
        out = self._scored({k: batch[k] for k in PAIR_KEYS}, "pair_rewards")
        assert isinstance(out, dict)
        return out

    def pair_logps(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sequence log-probabilities of pairs under the current weights (`PreferenceSteps.pair_logps`):
        `chosen`, `rejected` and their token counts, (N,) each; any number of pairs."""
        out = self._scored({k: batch[k] for k in PAIR_KEYS}, "pair_logps")
        assert isinstance(out, dict)
        return out

    def logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-token log-probabilities (B, T) under the current weights; any number of rows."""
        return self._scored({k: batch[k] for k in ("input_ids", "attention_mask")}, "logprobs")  # type: ignore[return-value]

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the driver reads before it can estimate advantages, (B, T) each: `old_logprobs` and
        `ref_logprobs` for a KL reward (`kl_reward_coef > 0`), `values` for a critic; nothing (and no
        Ray call) otherwise. The driver passes them back in the `train_rl_step` batch, which then does
        not score them again."""
        if not prepares(self.cfg):
            return {}
        out = self._scored({k: batch[k] for k in ("input_ids", "attention_mask")}, "prepare")
        assert isinstance(out, dict)
        if self.cfg.kl_reward_coef > 0 and self.cfg.old_logprobs == "rollout":
            out["old_logprobs"] = batch["rollout_logprobs"].float()  # pi_old is the sampler's
        return out

    def _scored(self, batch: dict[str, Tensor], method: str) -> Tensor | dict[str, Tensor]:
        """Row shards of every tensor in `batch` through every rank's `method`, concatenated back in row order."""
        rows = next(iter(batch.values())).shape[0]
        pad = -rows % self.world_size
        if pad:  # equal shards keep ZeRO-3's collective forwards in step on every rank
            batch = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in batch.items()}
        shards = shard_rows(batch, self.world_size)
        parts = ray.get([getattr(actor, method).remote(shard) for actor, shard in zip(self.actors, shards)])
        if isinstance(parts[0], dict):
            return {key: torch.cat([p[key] for p in parts])[:rows] for key in parts[0]}
        return torch.cat(parts)[:rows]

    def state_dict_for_rollout(self) -> dict[str, Tensor]:
        """Full weights (HF names, CPU tensors), gathered from every rank and returned by rank 0."""
        return ray.get([actor.state_dict_for_rollout.remote() for actor in self.actors])[0]

    def attach_weights(self, spec: WeightSpec) -> None:
        """Make learner rank 0 the weight publisher of `spec.transport` (`weights.TRANSPORTS`)."""
        ray.get([actor.attach_weights.remote(spec) for actor in self.actors])

    def join_weight_group(self, host: str, port: int, world_size: int) -> Any:
        """For a `rendezvous` transport: start rank 0's join as rank 0 of the weight group on
        `host:port` (the rollout actors join as 1..N at the same time); the ref to wait on."""
        return self.actors[0].join_weight_group.remote(host, port, world_size)

    def publish_weights(self, version: int) -> WeightHandle:
        """Learner rank 0 publishes the current weights as `version` (every rank takes part: ZeRO-3
        gathers each parameter); returns the handle the rollout actors load."""
        handles = ray.get([actor.publish_weights.remote(version) for actor in self.actors])
        return handles[0]

    def save(self, directory: str) -> None:
        """DeepSpeed checkpoint in `directory/deepspeed`, HF export in `directory/hf`."""
        ray.get([actor.save.remote(directory) for actor in self.actors])

    def load(self, directory: str) -> None:
        """Restore every rank from `save(directory)` (the same world_size and ZeRO stage)."""
        ray.get([actor.load.remote(directory) for actor in self.actors])

    def shutdown(self) -> None:
        """Close rank 0's weight publisher (its `shm` slots), then kill the actors (their processes,
        and with them the process group)."""
        try:
            ray.get([actor.close_weights.remote() for actor in self.actors], timeout=30)
        except Exception as exc:  # noqa: BLE001 -- a dead or hung rank: `remove_orphans` takes the slots later
            warnings.warn(f"LearnerGroup.shutdown: rank 0's weight publisher did not close ({exc})", stacklevel=2)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def prepares(cfg: LearnerConfig) -> bool:
    """Whether the driver reads learner outputs before it can estimate advantages: a KL reward needs
    k1(old, ref) per token, GAE the critic's values. Otherwise advantages come from rewards alone."""
    return cfg.kl_reward_coef > 0 or cfg.critic.enabled
