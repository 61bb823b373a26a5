"""One learner rank: a Hugging Face causal LM wrapped in a DeepSpeed engine.

`LearnerWorker` is a plain class (no Ray) so that tests can build one in-process with world_size 1;
`learner.actor.LearnerActor` wraps it for Ray and `learner.group.LearnerGroup` drives W of them as
one torch.distributed group.

Departures from a stock DeepSpeed training loop, and why:
- Losses are normalised by the GLOBAL loss-token count (see `learner.algos.sft`), so the micro-batch
  losses already sum to the global mean. DeepSpeed would divide by the accumulation steps and average
  gradients over ranks; we call `backward(..., scale_wrt_gas=False)` and multiply the loss by
  world_size to undo both, which makes W ranks reproduce one rank's gradient exactly.
- The accumulation boundary is set by hand on the last micro-batch, so a step may hold any multiple
  of micro_batch_size rows per rank (RL batches vary in size), not only the configured batch_size.
- Position ids come from the attention mask (`cumsum - 1`), so left-padded rows (rollout prompts)
  get the same positions as the unpadded sequences vLLM scored.

RL (`train_rl_step`): one call is one RL step on this rank's rows of the global batch of P x G
sequences. It first scores `old_logprobs` (the current weights, no grad) and, only when
`kl_coef > 0`, `ref_logprobs` from a frozen copy of the starting weights (`learner.reference`); then
it sweeps the rows `ppo_epochs` times, one optimizer step per minibatch of `batch_size` global
sequences (`batch_size / world_size` rows here), in the same minibatch order every epoch (no
shuffle: the rollout order is already random, and a fixed order keeps W ranks and 1 rank identical).
Every minibatch is normalised by its GLOBAL counts (`num_tokens`, `num_seqs`, in the group's
`StepPlan`), so the micro-batch losses of all ranks sum to the minibatch loss, as in supervised mode;
rows the plan left out (zero advantage everywhere) change neither the loss nor its gradient.
"""

from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at import time; without CUDA it must be told to use the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM, PreTrainedModel

from learner.algos import LOSSES, POLICY_LOSSES, entropy_from_logits, token_logprobs
from learner.algos.value import clipped_value_loss
from learner.config import LearnerConfig, skips_zero_advantage, validate
from learner.critic import ValueModel
from learner.reference import ReferenceModel, position_ids_from_mask
from learner.schedule import build_scheduler

if TYPE_CHECKING:
    from learner.group import StepPlan

# Files copied from model_dir into an HF export besides the weights and config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
# Per-token tensors an RL batch may carry besides BATCH_KEYS (all (B, T)).
RL_OPTIONAL_KEYS = ("advantages", "rollout_logprobs", "old_logprobs", "ref_logprobs", "values", "returns")
# Policy-loss metrics that are values of the loss (aggregated like it), not token means.
LOSS_VALUES = ("learner/pg_loss", "learner/kl_loss")
BF16_STAGE0_WARNING = (
    "LearnerConfig: precision=bf16 with zero_stage=0 runs DeepSpeed's pure-bf16 data parallel "
    "(bf16 weights, gradients and AdamW state, no fp32 master copy); zero_stage>=1 keeps fp32 master "
    "weights at the same memory cost on one rank"
)


def ds_config(cfg: LearnerConfig, grad_accum: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` (ZeRO stage, precision, clipping, batch geometry)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        # ZeRO 1-3 keep fp32 master weights; fp32 gradient accumulation makes ZeRO-1 take the same
        # path. DeepSpeed has no fp32 master copy for bf16 at stage 0 (see BF16_STAGE0_WARNING).
        "data_types": {"grad_accum_dtype": "fp32"} if cfg.precision == "bf16" and cfg.zero_stage > 0 else {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def init_distributed(rank: int, world_size: int, master_port: int) -> None:
    """Join the learner process group on 127.0.0.1:`master_port` (gloo on CPU, nccl on GPU).

    A process joins one group for its lifetime (DeepSpeed caches its groups); joining again with
    the same rank and world size is a no-op, with different ones an error.
    """
    if torch.distributed.is_initialized():
        have = (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if have != (rank, world_size):
            raise RuntimeError(
                f"LearnerWorker: this process already joined a learner group as (rank, world_size) = "
                f"{have}; it cannot join another as {(rank, world_size)}"
            )
        return
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its device is always index 0.
            "LOCAL_RANK": "0",
        }
    )
    backend = get_accelerator().communication_backend_name()
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{master_port}", rank=rank, world_size=world_size
    )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def check_batch(batch: dict[str, Tensor], micro_batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, loss_mask) after checking shapes, row count and column 0."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"learner batch: missing {missing}; expected keys {list(BATCH_KEYS)}")
    input_ids, attention_mask, loss_mask = (batch[k] for k in BATCH_KEYS)
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            "learner batch: input_ids, attention_mask and loss_mask must share one (B, T) shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(loss_mask.shape)}"
        )
    rows = input_ids.shape[0]
    if rows == 0 or rows % micro_batch_size != 0:
        raise ValueError(
            f"learner batch: this rank got {rows} rows, which must be a positive multiple of "
            f"LearnerConfig.micro_batch_size ({micro_batch_size})"
        )
    if bool(loss_mask[:, 0].any()):
        raise ValueError(
            "learner batch: loss_mask[:, 0] must be 0 — token 0 has no prefix to predict it from "
            "(logprobs[:, t] scores input_ids[:, t] given input_ids[:, :t])"
        )
    return input_ids, attention_mask, loss_mask


def check_rl_batch(batch: dict[str, Tensor], tis_cap: float | None, critic: bool = False) -> None:
    """`advantages` (and every optional per-token tensor given, or required by tis_cap or the critic)
    match input_ids."""
    shape = batch["input_ids"].shape
    if "advantages" not in batch:
        raise ValueError("learner RL batch: missing 'advantages' (B, T), broadcast to the response tokens")
    if critic and not {"values", "returns"} <= set(batch):
        raise ValueError("learner RL batch: the critic (learner.critic.enabled) trains on 'values' (from prepare) "
                         "and 'returns' (B, T); estimate advantages with rl.advantage=gae")
    if tis_cap is not None and "rollout_logprobs" not in batch:
        raise ValueError(
            f"learner RL batch: LearnerConfig.tis_cap = {tis_cap} needs 'rollout_logprobs' (B, T) in the batch"
        )
    for key in RL_OPTIONAL_KEYS:
        if key in batch and batch[key].shape != shape:
            raise ValueError(
                f"learner RL batch: {key} {tuple(batch[key].shape)} must match input_ids {tuple(shape)} (B, T)"
            )


class LearnerWorker:
    """One DeepSpeed rank: train steps, log-probabilities, weight export, checkpoints."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: str,
        rank: int,
        world_size: int,
        total_steps: int,
        master_port: int = 29500,
    ) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = validate(cfg, world_size)
        self.loss_fn = _pick_loss(cfg.loss)
        if cfg.precision == "bf16" and cfg.zero_stage == 0:
            warnings.warn(BF16_STAGE0_WARNING, stacklevel=2)
        init_distributed(rank, world_size, master_port)
        torch.manual_seed(cfg.seed + rank)
        self.engine = _build_engine(cfg, _policy_model(cfg, model_dir), cfg.lr, total_steps, self.grad_accum,
                                    world_size)
        self.device = self.engine.device
        self.step = 0
        self.policy_loss = POLICY_LOSSES[cfg.policy_loss]
        # Built only when a KL term (loss or reward) needs it; rebuilt from model_dir (never
        # checkpointed) on resume.
        self.reference = (
            ReferenceModel(model_dir, _dtype(cfg.precision), self.device, cfg.micro_batch_size)
            if cfg.kl_coef > 0 or cfg.kl_reward_coef > 0
            else None
        )
        # PPO's value model, its own DeepSpeed engine with the policy's batch geometry (learner.critic).
        self.critic = (
            _build_engine(cfg, ValueModel(cfg.critic.path or model_dir), cfg.critic.lr, total_steps,
                          self.grad_accum, world_size)
            if cfg.critic.enabled
            else None
        )

    # ---- training -------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Tensor], num_tokens: int | None = None) -> dict[str, float]:
        """One optimizer step on this rank's shard of the global batch.

        `num_tokens` is the global batch's loss-token count (all ranks); it defaults to this shard's
        own count, which is right when world_size is 1.
        """
        input_ids, attention_mask, loss_mask = check_batch(batch, self.cfg.micro_batch_size)
        if num_tokens is None:
            num_tokens = int(loss_mask.sum())
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]

        def micro_loss(rows: slice) -> tuple[Tensor, dict[str, float]]:
            logprobs = self._forward_logprobs(input_ids[rows], attention_mask[rows])  # (b, T)
            loss, metrics = self.loss_fn(logprobs, loss_mask[rows].to(self.device), num_tokens)
            # loss metrics are this micro-batch's share of global sums, so they add up
            return loss, metrics | {"learner/loss": loss.item(), "learner/tokens": float(loss_mask[rows].sum()),
                                    "learner/seq_tokens": float(attention_mask[rows].sum())}

        totals, grad_norm = self._accumulate(self.engine, input_ids.shape[0], micro_loss)
        self.step += 1
        elapsed = time.perf_counter() - start
        totals.update(
            {
                "learner/grad_norm": grad_norm,
                "learner/lr": float(lr),
                "learner/step": float(self.step),
                "perf/learner_step_s": elapsed,
                "perf/learner_tokens_per_s": totals["learner/seq_tokens"] / elapsed,
            }
        )
        return totals

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-token log-probabilities (B, T) of `batch["input_ids"]` under the current weights, on CPU.

        Under ZeRO-3 every rank must call this with the same number of rows (the forward gathers
        parameters collectively).
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        self.engine.eval()
        out = []
        for start in range(0, input_ids.shape[0], self.cfg.micro_batch_size):
            rows = slice(start, start + self.cfg.micro_batch_size)
            out.append(self._forward_logprobs(input_ids[rows], attention_mask[rows]).cpu())
        return torch.cat(out) if out else torch.zeros(input_ids.shape, dtype=torch.float32)

    def _forward_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        attention_mask = attention_mask.to(self.device)
        out = self.engine(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.logits  # (b, T, V)

    def _forward_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = self._forward_logits(input_ids, attention_mask)  # (b, T, V)
        return token_logprobs(logits, input_ids.to(self.device))  # (b, T)

    # ---- RL ---------------------------------------------------------------------------------------

    def train_rl_step(self, batch: dict[str, Tensor], plan: StepPlan | None = None) -> dict[str, float]:
        """One RL step: old (and ref) logprobs, then `ppo_epochs` sweeps of minibatch optimizer steps.

        This rank's rows are in minibatch order: minibatch m is the next `plan.rows[m]` rows, and
        `plan` holds each minibatch's GLOBAL loss normalisers (all ranks; `learner.group.StepPlan`).
        With world_size 1 it may be left out: the worker then plans the step itself from the whole
        batch (`learner.group.plan_rl_step`, leaving zero-advantage rows out as the config says).

        Metrics (each rank's share; `LearnerGroup` sums them over ranks): the loss metrics
        (`learner/loss`, `pg_loss`, `clip_frac`, `approx_kl`, `kl`, ...) are the mean over this call's
        optimizer steps of each minibatch's global value; `learner/entropy` and
        `learner/logprob_diff` are token means over the whole batch; `learner/grad_norm` is the mean
        over optimizer steps; `learner/lr` is the last step's. The token means are over the rows
        trained (all rows unless `skip_zero_advantage` left some out).
        """
        cfg = self.cfg
        # a whole batch is whole micro-batches; a planned shard may end in a shorter one
        check_batch(batch, cfg.micro_batch_size if plan is None else 1)
        check_rl_batch(batch, cfg.tis_cap, critic=self.critic is not None)
        if plan is None:
            if self.world_size != 1:
                raise ValueError("LearnerWorker.train_rl_step: the step's plan is required when world_size > 1")
            from learner.group import plan_rl_step, take_rows  # driver-side helpers, no Ray call

            plan, index, pad = plan_rl_step(batch["advantages"], batch["loss_mask"], cfg.batch_size, 1,
                                            skips_zero_advantage(cfg))
            batch = take_rows(batch, index[0], pad[0])
        input_ids, attention_mask, loss_mask = check_batch(batch, 1)
        num_tokens, num_seqs, trained_tokens = plan.num_tokens, plan.num_seqs, plan.trained_tokens
        if input_ids.shape[0] != sum(plan.rows) or not len(num_tokens) == len(num_seqs) == len(plan.rows):
            raise ValueError(
                f"LearnerWorker.train_rl_step: {input_ids.shape[0]} rows on this rank, expected the plan's "
                f"{sum(plan.rows)} ({len(plan.rows)} minibatches)"
            )
        offsets = [0]
        for rows_m in plan.rows:
            offsets.append(offsets[-1] + rows_m)
        start = time.perf_counter()
        tensors = self._rl_inputs(batch)  # old/ref/rollout logprobs, advantages, loss_mask (B, T)
        whole_batch_tokens = float(sum(trained_tokens))
        totals: dict[str, float] = {}
        once: dict[str, float] = {
            "learner/tokens": float(loss_mask.sum()),
            "learner/seq_tokens": float(attention_mask.sum()),
        }
        rollout_check = None  # with old_logprobs=rollout: (rollout logprobs, normaliser) of minibatch 0
        if "rollout_logprobs" in batch and cfg.old_logprobs == "rollout":
            once["learner/logprob_diff"] = 0.0
            rollout_check = (batch["rollout_logprobs"][:plan.rows[0]].float(), float(trained_tokens[0]))
        elif "rollout_logprobs" in batch:
            gap = (tensors["old_logprobs"] - batch["rollout_logprobs"]).abs()  # (B, T)
            once["learner/logprob_diff"] = (
                float(torch.where(loss_mask != 0, gap, 0.0).sum()) / whole_batch_tokens
            )
        if cfg.entropy_metric:
            once["learner/entropy"] = 0.0
        grad_norms: list[float] = []
        lr = 0.0
        for epoch in range(cfg.ppo_epochs):
            for m in range(len(num_tokens)):
                rows = slice(offsets[m], offsets[m + 1])
                lr = self.engine.get_lr()[0]
                entropy_norm = whole_batch_tokens if (epoch == 0 and cfg.entropy_metric) else None
                metrics, grad_norm = self._rl_optimizer_step(
                    input_ids[rows], attention_mask[rows], {k: v[rows] for k, v in tensors.items()},
                    (num_tokens[m], num_seqs[m], trained_tokens[m]), entropy_norm,
                    rollout_check if epoch == m == 0 else None,
                )  # fmt: skip
                grad_norms.append(grad_norm)
                if self.critic is not None:
                    critic_rows = {k: batch[k][rows] for k in ("values", "returns", "loss_mask")}
                    metrics |= self._critic_step(input_ids[rows], attention_mask[rows], critic_rows, num_tokens[m])
                for key, value in metrics.items():
                    if key in ("learner/entropy", "learner/logprob_diff"):
                        once[key] += value
                    else:
                        totals[key] = totals.get(key, 0.0) + value
        n_steps = cfg.ppo_epochs * len(num_tokens)
        elapsed = time.perf_counter() - start
        out = {key: value / n_steps for key, value in totals.items()} | once
        out |= {
            "learner/grad_norm": sum(grad_norms) / n_steps,
            "learner/lr": float(lr),
            "learner/step": float(self.step),
            "learner/optimizer_steps": float(n_steps),
            "learner/skipped_rows_frac": plan.skipped_rows_frac,
            "perf/learner_step_s": elapsed,
            "perf/learner_tokens_per_s": once["learner/seq_tokens"] / elapsed,
        }
        return out

    @torch.no_grad()
    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the driver needs before it can estimate advantages, (B, T) on CPU: `old_logprobs`
        (current weights), `ref_logprobs` when a reference model exists, `values` when a critic does."""
        out = {} if self.cfg.old_logprobs == "rollout" else {"old_logprobs": self.logprobs(batch)}
        if self.reference is not None:
            out["ref_logprobs"] = self.reference.logprobs(batch["input_ids"], batch["attention_mask"])
        if self.critic is not None:
            self.critic.eval()
            ids, mask, mbs = batch["input_ids"], batch["attention_mask"], self.cfg.micro_batch_size
            out["values"] = torch.cat([
                self.critic(ids[i:i + mbs].to(self.device), mask[i:i + mbs].to(self.device)).float().cpu()
                for i in range(0, ids.shape[0], mbs)
            ])  # fmt: skip
        return out

    def _rl_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The per-token tensors the policy loss reads, on CPU (B, T): `old_logprobs` from the current
        weights, `ref_logprobs` only with a reference model, `rollout_logprobs` only with tis_cap. Those
        `prepare` made are taken from the batch when the driver passes them back."""
        scored = {k: batch[k] for k in ("old_logprobs", "ref_logprobs") if k in batch}
        if "old_logprobs" not in scored and self.cfg.old_logprobs == "rollout":
            scored["old_logprobs"] = batch["rollout_logprobs"].float()
        if "old_logprobs" not in scored:
            scored["old_logprobs"] = self.logprobs(batch)
        if self.reference is not None and "ref_logprobs" not in scored:
            scored["ref_logprobs"] = self.reference.logprobs(batch["input_ids"], batch["attention_mask"])
        if self.reference is None:
            scored.pop("ref_logprobs", None)
        tensors = scored | {"advantages": batch["advantages"].float(), "loss_mask": batch["loss_mask"]}
        if self.cfg.tis_cap is not None:
            tensors["rollout_logprobs"] = batch["rollout_logprobs"].float()
        return tensors

    def _rl_optimizer_step(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        tensors: dict[str, Tensor],
        normalisers: tuple[float, float, float],
        entropy_norm: float | None,
        rollout_check: tuple[Tensor, float] | None = None,
    ) -> tuple[dict[str, float], float]:
        """Micro-batches of one minibatch with gradient accumulation, then one optimizer step.

        `normalisers` are the minibatch's global (loss tokens, sequences, loss tokens of the rows
        trained). Returns this rank's share of the minibatch's loss metrics, token means over the
        rows trained (and of `learner/entropy` over the whole batch when `entropy_norm` is set; of
        `learner/logprob_diff`, the token mean of |learner - rollout| logprobs over this minibatch
        before its update, when `rollout_check` gives the rollout's logprobs and the minibatch's
        global token count) and the step's global gradient norm.
        """
        num_tokens, num_seqs, trained_tokens = normalisers
        metric_scale = num_tokens / trained_tokens  # the loss's token means -> means over rows trained

        def micro_loss(rows: slice) -> tuple[Tensor, dict[str, float]]:
            logits = self._forward_logits(input_ids[rows], attention_mask[rows])  # (b, T, V)
            logprobs = token_logprobs(logits, input_ids[rows].to(self.device))  # (b, T)
            micro = {k: v[rows].to(self.device) for k, v in tensors.items()}
            mask = micro.pop("loss_mask")
            extra: dict[str, float] = {}
            if entropy_norm is not None:
                with torch.no_grad():
                    extra["learner/entropy"] = entropy_from_logits(logits.detach(), mask, entropy_norm).item()
            if rollout_check is not None:
                gap = (logprobs.detach() - rollout_check[0][rows].to(self.device)).abs()  # (b, T)
                extra["learner/logprob_diff"] = float(torch.where(mask != 0, gap, 0.0).sum()) / rollout_check[1]
            loss, metrics = self.policy_loss(
                logprobs, micro.pop("old_logprobs"), micro.pop("advantages"), mask,
                **micro, **self._loss_options(), num_tokens=num_tokens, num_seqs=num_seqs,
            )  # fmt: skip
            if metric_scale != 1.0:
                metrics = {k: v if k in LOSS_VALUES else v * metric_scale for k, v in metrics.items()}
            return loss, metrics | extra | {"learner/loss": loss.item()}

        totals, grad_norm = self._accumulate(self.engine, input_ids.shape[0], micro_loss)
        self.step += 1
        return totals, grad_norm

    def _critic_step(
        self, input_ids: Tensor, attention_mask: Tensor, tensors: dict[str, Tensor], num_tokens: float
    ) -> dict[str, float]:
        """One critic optimizer step on a minibatch: the clipped value loss against the GAE returns."""
        assert self.critic is not None
        critic = self.critic

        def micro_loss(rows: slice) -> tuple[Tensor, dict[str, float]]:
            values = critic(input_ids[rows].to(self.device), attention_mask[rows].to(self.device))  # (b, T)
            micro = {k: v[rows].to(self.device) for k, v in tensors.items()}
            return clipped_value_loss(values, micro["values"], micro["returns"], micro["loss_mask"],
                                      self.cfg.critic.value_clip, num_tokens)

        totals, grad_norm = self._accumulate(critic, input_ids.shape[0], micro_loss)
        return totals | {"critic/grad_norm": grad_norm}

    def _accumulate(
        self, engine: Any, rows: int, micro_loss: Any
    ) -> tuple[dict[str, float], float]:
        """Run `micro_loss(rows_slice) -> (loss, metrics)` over the micro-batches of `rows` rows (the last
        one shorter when micro_batch_size does not divide `rows`) with gradient accumulation into one
        optimizer step of `engine`; (summed metrics, global grad norm)."""
        engine.train()
        mbs = self.cfg.micro_batch_size
        n_micro = -(-rows // mbs)
        totals: dict[str, float] = {}
        fallback_norm: float | None = None
        for i in range(n_micro):
            engine.set_gradient_accumulation_boundary(i == n_micro - 1)
            loss, metrics = micro_loss(slice(i * mbs, min((i + 1) * mbs, rows)))
            engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if i == n_micro - 1:  # plain ZeRO-0 fp32 does not record the norm; gradients are reduced by now
                fallback_norm = _grad_norm(engine.module) if self.cfg.zero_stage == 0 else None
            engine.step()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = fallback_norm
        return totals, float(grad_norm) if grad_norm is not None else float("nan")

    def _loss_options(self) -> dict[str, Any]:
        """The policy loss's keyword numbers from the config (tis_cap only when TIS is on)."""
        cfg = self.cfg
        options: dict[str, Any] = {
            "clip_low": cfg.clip_low,
            "clip_high": cfg.clip_high,
            "clip_ratio_c": cfg.clip_ratio_c,
            "kl_coef": cfg.kl_coef,
            "kl_estimator": cfg.kl_estimator,
            "aggregation": cfg.aggregation,
            "norm_len": cfg.norm_len,
        }
        if cfg.tis_cap is not None:
            options["tis_cap"] = cfg.tis_cap
        return options

    # ---- weights and checkpoints -----------------------------------------------------------------

    def state_dict_for_rollout(self) -> dict[str, Tensor]:
        """Full weights on CPU under HF parameter names (rank 0; other ranks return {}).

        Every rank must call it: under ZeRO-3 each parameter is all-gathered in turn, so peak extra
        memory is one parameter, not the whole model.
        """
        module = self.engine.module
        zero3 = self.cfg.zero_stage == 3
        out: dict[str, Tensor] = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=zero3):
                if self.rank == 0:
                    out[name] = param.detach().to("cpu", copy=True)
        if self.rank == 0:
            persistent = set(module.state_dict().keys())
            for name, buf in module.named_buffers():
                if name in persistent:
                    out[name] = buf.detach().to("cpu", copy=True)
        return out

    def save(self, directory: str) -> None:
        """Exact-resume checkpoint in `directory/deepspeed`; HF export (+ tokenizer) in `directory/hf`."""
        root = Path(directory)
        ds_dir = root / "deepspeed"
        self.engine.save_checkpoint(str(ds_dir), tag=f"step{self.step}", client_state={"step": self.step})
        ds_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), ds_dir / f"rng_rank{self.rank}.pt")
        if self.critic is not None:
            self.critic.save_checkpoint(str(root / "critic"), tag=f"step{self.step}")
        state = self.state_dict_for_rollout()
        if self.rank == 0:
            _export_hf(self.engine.module, state, self.model_dir, root / "hf")
        torch.distributed.barrier()

    def load(self, directory: str) -> None:
        """Restore model, optimizer, LR scheduler, step and this rank's RNG from `save(directory)`."""
        ds_dir = Path(directory) / "deepspeed"
        path, client_state = self.engine.load_checkpoint(
            str(ds_dir), load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"LearnerWorker.load: no DeepSpeed checkpoint under {ds_dir}")
        self.step = int(client_state["step"])
        if self.critic is not None:
            critic_path, _ = self.critic.load_checkpoint(
                str(Path(directory) / "critic"), load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if critic_path is None:
                raise FileNotFoundError(f"LearnerWorker.load: no critic checkpoint under {Path(directory) / 'critic'}")
        rng_file = ds_dir / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))

    def close(self) -> None:
        """Drop the engine. The process group stays: DeepSpeed caches its groups for the life of the
        process, so a later worker in this process (tests) must reuse the same rank and world size."""
        self.engine.destroy()
        del self.engine
        if self.critic is not None:
            self.critic.destroy()
            self.critic = None


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _grad_norm(module: torch.nn.Module) -> float | None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _pick_loss(name: str) -> Any:
    if name not in LOSSES:
        raise ValueError(f"LearnerConfig.loss: {name!r} is not in learner.algos.LOSSES {sorted(LOSSES)}")
    return LOSSES[name]


def _build_engine(
    cfg: LearnerConfig, model: torch.nn.Module, lr: float, total_steps: int, grad_accum: int, world_size: int
) -> deepspeed.DeepSpeedEngine:
    """`model` under DeepSpeed with AdamW at peak `lr` and the configured schedule (policy or critic)."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.lr_schedule, cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config(cfg, grad_accum, world_size),
        dist_init_required=False,
    )
    return engine


def _policy_model(cfg: LearnerConfig, model_dir: str) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _export_hf(module: PreTrainedModel, state: dict[str, Tensor], model_dir: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(out_dir), state_dict=state)
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.exists() and not (out_dir / name).exists():
            shutil.copy2(src, out_dir / name)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
