"""RL training on one rank: one call is one RL step on this rank's rows of the global batch.

It first scores `old_logprobs` (the current weights, no grad; or takes the sampler's with
`old_logprobs=rollout`) and, only with a reference model (a KL term), `ref_logprobs` from a frozen
copy of the starting weights (`learner.reference`); then it sweeps the rows `ppo_epochs` times, one
optimizer step per minibatch of `batch_size` global sequences (`batch_size / world_size` rows here),
in the same minibatch order every epoch (no shuffle: the rollout order is already random, and a fixed
order keeps W ranks and 1 rank identical). Every minibatch is normalised by its GLOBAL counts
(`num_tokens`, `num_seqs`, in the `learner.plan.StepPlan`), so the micro-batch losses of all ranks
sum to the minibatch loss, as in supervised mode; rows the plan left out (zero advantage everywhere)
change neither the loss nor its gradient. With a critic (PPO), each minibatch also takes one critic
step on the clipped value loss.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from learner.algos import entropy_from_logits, kl_k1, token_logprobs
from learner.algos.value import clipped_value_loss
from learner.config import skips_zero_advantage
from learner.plan import RL_KEYS, RL_OPTIONAL_KEYS, StepPlan, plan_rl_step, take_rows
from learner.rank import LearnerRank, check_batch

# Policy-loss metrics that are values of the loss (aggregated like it), not token means.
LOSS_VALUES = ("learner/pg_loss", "learner/kl_loss")


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
    for key in RL_KEYS + RL_OPTIONAL_KEYS:
        if key in batch and batch[key].shape != shape:
            raise ValueError(
                f"learner RL batch: {key} {tuple(batch[key].shape)} must match input_ids {tuple(shape)} (B, T)"
            )



class RLSteps(LearnerRank):
    """`train_rl_step` and `prepare` on the rank `LearnerRank` sets up."""

    def train_rl_step(self, batch: dict[str, Tensor], plan: StepPlan | None = None) -> dict[str, float]:
        """One RL step: old (and ref) logprobs, then `ppo_epochs` sweeps of minibatch optimizer steps.

        This rank's rows are in minibatch order: minibatch m is the next `plan.rows[m]` rows, and
        `plan` holds each minibatch's GLOBAL loss normalisers (all ranks; `learner.plan.StepPlan`).
        With world_size 1 it may be left out: the worker then plans the step itself from the whole
        batch (`learner.plan.plan_rl_step`, leaving zero-advantage rows out as the config says).

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
        if "ref_logprobs" in tensors:  # k1(old, ref), the token mean: how far the policy is from the reference
            kl = kl_k1(tensors["old_logprobs"], tensors["ref_logprobs"])  # (B, T)
            once["rl/kl_to_ref"] = float(torch.where(loss_mask != 0, kl, 0.0).sum()) / whole_batch_tokens
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
        """What the driver reads before it can estimate advantages (`learner.group.prepares`), (B, T) on
        CPU: `ref_logprobs` and (unless pi_old is the sampler's) `old_logprobs` for a KL reward,
        `values` when a critic exists."""
        out: dict[str, Tensor] = {}
        if self.cfg.kl_reward_coef > 0:
            assert self.reference is not None
            out["ref_logprobs"] = self.reference.logprobs(batch["input_ids"], batch["attention_mask"])
            if self.cfg.old_logprobs != "rollout":
                out["old_logprobs"] = self.logprobs(batch)
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
