"""The RL stage (synchronous GRPO-family loop): the diagram of DESIGN.md §2, top to bottom.

    tasks -> RolloutGroup (G responses each) -> verifier actors (a Verdict each) -> advantages
          -> LearnerGroup.train_rl_step -> weights published to the rollout actors -> metrics

Every algorithm difference is a table entry or a number picked by config (`rl.advantage` in
`learner.algos.ESTIMATORS`, `learner.policy_loss`, `learner.aggregation`, `learner.kl_coef`,
`learner.kl_reward_coef`, `learner.critic`, DAPO's `rl.dynamic_sampling` / `rl.overlong_buffer` /
`rl.mask_truncated`), never an `if algo == ...` here. The driver turns rewards into per-token rewards
and advantages (`add_advantages`) and makes one call to the learners per step, which trains and
publishes the new weights from learner rank 0 (`LearnerGroup.train_rl_step_and_publish`); the driver
hands the `WeightHandle` to the rollout actors. Only a KL reward or a critic (PPO's GAE) needs the
learners' numbers before advantages exist: then `LearnerGroup.prepare` is a call of its own first.
Samples a verifier cannot judge (`score=None`) are dropped: their tokens leave `loss_mask` and their
reward is left out of the group statistics. What a step trains on comes from the collector `rl.collector`
names (`engine.collectors`), built once and called from the rollout thread (`engine.ahead`).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, closing
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from engine import errors, stopping
from engine.ahead import Ahead
from engine.collector_base import CollectorContext, eval_seed, score
from engine.collectors import collector_class
from engine.config import AssayConfig, ConfigError
from engine.metrics import MetricsSink
from engine.placement import place
from engine.ray_cluster import init_ray
from engine.runs import SourceAt, StageResult, export_final, finish_step, open_stage, resume, save_step
from engine.scoring import start_verifier_actors
from engine.tasks import Task
from learner.algos import ESTIMATORS, kl_k1, token_rewards
from learner.group import LearnerGroup
from rollout.group import RolloutGroup
from rollout.types import Response
from rollout.worker import sampling_from_config
from weights.nccl import free_port


def run_rl(cfg: AssayConfig) -> StageResult:
    """Train `cfg.steps` RL steps from the run's latest earlier-stage export (or `model.path`)."""
    make_collector = collector_class(cfg.rl.collector)  # a bad `module:Class` fails before anything is written
    stage = open_stage(cfg, verifiers=True)
    run_dir, resume_from, source, model_dir = stage.run_dir, stage.resume_from, stage.source, str(stage.model_dir)
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
    metrics: dict[str, float] = {}
    with ExitStack() as cleanup:  # every part started is stopped, in reverse order, whatever happens
        placement = place(cfg)  # cluster.placement: where the learners and rollout actors go
        cleanup.callback(placement.remove)
        learner = LearnerGroup(cfg.learner, model_dir, cfg.cluster.learners, total_steps=optimizer_steps(cfg),
                               actor_options=placement.learner_options)
        cleanup.callback(learner.shutdown)
        rollout = RolloutGroup(cfg.rollout, model_dir, actor_options=placement.rollout_options)
        cleanup.callback(rollout.shutdown)
        connect_weights(cfg, learner, rollout, placement.record(run_dir, learner.actors, rollout.actors))
        scorers = start_verifier_actors(cfg.verifier, cfg.rl.verifier_actors, log_path=run_dir / "verifier.log")
        cleanup.callback(lambda: [actor.close.remote() for actor in scorers])
        eval_tasks = source.eval_tasks(cfg.task.eval_size)
        collector = make_collector(CollectorContext(cfg, source, rollout, scorers, run_dir, eval_tasks))
        start = resume(resume_from, learner, source, collector) if resume_from is not None else 0
        if start:  # the rollout actors load the resumed weights
            rollout.update_weights(learner.publish_weights, version=start)
        sink = cleanup.enter_context(closing(MetricsSink(run_dir, cfg.steps, start_step=start,
                                                         progress=cfg.progress)))
        if start == 0:  # the baseline the curves start from
            sink.log(0, evaluate(rollout, scorers, eval_tasks, cfg))

        def produce(step: int) -> tuple[list[Response], torch.Tensor, dict[str, float], SourceAt]:
            return *collector.collect(step), SourceAt(source.state_dict(), collector.state_dict())

        # rollout of step j may start once step j - rl.max_staleness - 1 is done (0: synchronous)
        ahead = Ahead(produce, start, cfg.steps, cfg.rl.max_staleness)
        cleanup.callback(ahead.close)
        stream_at: Any = source
        t_end = time.perf_counter()
        stopping.check(start, lambda: None)  # a signal during start-up: nothing new to save
        for step in range(start, cfg.steps):
            errors.step_started(step + 1)
            t0 = time.perf_counter()
            responses, rewards, metrics, stream_at = ahead.get(step)  # rewards (P, G)
            t2 = time.perf_counter()
            if rewards.numel():
                batch = rl_batch(responses, rewards.flatten(), pad_id=0)
                batch |= learner.prepare(batch)  # a call only for a KL reward or a critic's values
                metrics.update(add_advantages(batch, rewards, cfg))
                metrics.update(train_and_publish(learner, rollout, batch, version=step + 1))
            else:  # nothing to train on: the same weights as the next version
                metrics.update(rollout.update_weights(learner.publish_weights, version=step + 1))
            t4 = time.perf_counter()
            t3 = t4 - metrics["perf/weight_sync_s"]
            tokens = sum(len(r.response_ids) for r in responses)
            metrics.update({"perf/wait_s": t2 - t0, "perf/learn_s": t3 - t2, "perf/sync_s": t4 - t3,
                            "perf/step_s": t4 - t_end, "perf/tokens_per_s": tokens / (t4 - t_end)})
            finish_step(step + 1, cfg, metrics, lambda: evaluate(rollout, scorers, eval_tasks, cfg),
                        sink, run_dir, learner, stream_at)
            ahead.finished(step + 1)
            errors.step_finished()
            if step + 1 < cfg.steps:
                stopping.check(step + 1, partial(save_step, run_dir, learner, stream_at, step + 1, cfg.keep_checkpoints))
            t_end = time.perf_counter()
        export = export_final(run_dir, learner, stream_at, cfg.steps)
        collector.finish(run_dir)  # the collector's own report
    return StageResult(run_dir, export, cfg.steps, metrics)


def connect_weights(cfg: AssayConfig, learner: LearnerGroup, rollout: RolloutGroup, where: dict[str, Any]) -> None:
    """Make learner rank 0 the publisher of `rollout.weight_sync` and, for a `rendezvous` transport,
    join it with every rollout actor. A `same_node` transport (`shm`) needs learner rank 0, the
    rollout actors and this driver (the doorbells) on one node; `where` is `Placement.record`'s."""
    import ray

    if rollout.transport.same_node:
        here = ray.get_runtime_context().get_node_id()
        elsewhere = sorted({where["learners"][0], *where["rollout"]} - {here})
        if elsewhere:
            raise ConfigError(
                f"rollout.weight_sync={cfg.rollout.weight_sync} needs learner rank 0, the rollout actors and "
                f"the driver on one node, but cluster.placement={cfg.cluster.placement} put some on node(s) "
                f"{', '.join(n[:8] for n in elsewhere)}; use rollout.weight_sync=ray across nodes")
    learner.attach_weights(cfg.rollout.weight_spec())
    if rollout.transport.rendezvous:
        host = ray.util.get_node_ip_address()
        port = free_port(host)
        joins = rollout.join_weight_group(host, port)
        ray.get([learner.join_weight_group(host, port, len(rollout.actors) + 1), *joins])


def train_and_publish(learner: LearnerGroup, rollout: RolloutGroup, batch: dict[str, torch.Tensor],
                      version: int) -> dict[str, float]:
    """One RL step on the learners and the new weights served as `version`: one call to the learners
    (train, then rank 0 publishes), then the handle to the rollout actors. A `rendezvous` transport's
    readers must wait in the publish, so there it is a second call, with the actors' loads started
    first."""
    if rollout.transport.rendezvous:
        metrics = learner.train_rl_step(batch)
        return metrics | rollout.update_weights(learner.publish_weights, version)
    metrics, handle = learner.train_rl_step_and_publish(batch, version)
    return metrics | rollout.load_weights(handle, publish_s=metrics.pop("perf/weight_publish_s"))


def optimizer_steps(cfg: AssayConfig) -> int:
    """Optimizer steps of the whole stage: each RL step sweeps P×G sequences in minibatches, K times."""
    per_step = -(-cfg.rl.prompts_per_step * cfg.rollout.n // cfg.learner.batch_size)  # ceil
    return cfg.steps * per_step * cfg.learner.ppo_epochs


def rl_batch(responses: list[Response], rewards: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `prompt + response` rows with the rollout logprobs of their tokens.

    Position t of a row holds token t; `loss_mask[t] = 1` when token t is a response token (it is
    predicted from tokens < t, the learner's convention); rows with a NaN reward are masked out.
    """
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in responses)
    rows = len(responses)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros(rows, width)  # (B, T)
    rollout_logprobs = torch.zeros(rows, width)  # (B, T)
    for i, r in enumerate(responses):
        start, end = len(r.prompt_ids), len(r.prompt_ids) + len(r.response_ids)
        input_ids[i, :end] = torch.tensor(r.prompt_ids + r.response_ids)
        attention_mask[i, :end] = 1
        loss_mask[i, start:end] = 0.0 if torch.isnan(rewards[i]) else 1.0
        rollout_logprobs[i, start:end] = torch.tensor(r.rollout_logprobs)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "rollout_logprobs": rollout_logprobs}


def add_advantages(batch: dict[str, torch.Tensor], rewards: torch.Tensor, cfg: AssayConfig) -> dict[str, float]:
    """Put `advantages` (and `returns`, for a critic) into `batch`: the outcome `rewards` (P, G) on each
    response's last token, minus `learner.kl_reward_coef` x k1(old, ref) on every response token (with
    the `prepare`d logprobs), through the estimator `rl.advantage` names. Returns the reward-side
    metrics (`rl/kl_to_ref` is the learners': they hold old and reference logprobs either way)."""
    mask = batch["loss_mask"]
    kl = kl_k1(batch["old_logprobs"], batch["ref_logprobs"]) if "ref_logprobs" in batch else None  # (B, T)
    per_token = token_rewards(rewards.flatten(), mask, kl, cfg.learner.kl_reward_coef)  # (B, T)
    advantages, returns = ESTIMATORS[cfg.rl.advantage](per_token, mask, batch.get("values"),
                                                      group_size=cfg.rollout.n, gamma=cfg.rl.gamma, lam=cfg.rl.lam)
    batch["advantages"] = advantages
    metrics = {}
    if returns is not None:
        batch["returns"] = returns
        metrics["critic/returns_mean"] = float(returns.sum() / mask.sum().clamp(min=1))
    return metrics


def evaluate(rollout: RolloutGroup, scorers: list[Any], tasks: list[Task], cfg: AssayConfig) -> dict[str, float]:
    """On the fixed eval set: greedy exact match (`eval/accuracy`, as the supervised stages report it),
    pass@1 (the mean score of G samples at the rollout temperature) and pass@G (any sample solved).
    Samples the verifier could not judge (infra errors) are left out of each, never counted as 0;
    `eval/infra_error_frac` is their share."""
    n = cfg.rollout.n
    sampling = sampling_from_config(cfg.rollout, seed=eval_seed(cfg.seed))
    greedy, _ = score(scorers, tasks, rollout.generate(tasks, 1, replace(sampling, temperature=0.0)), 1)  # (P, 1)
    rewards, _ = score(scorers, tasks, rollout.generate(tasks, n, sampling), n)  # (P, G)
    solved = (rewards >= 1.0).any(1).float().masked_fill(torch.isnan(rewards).all(1), float("nan"))  # (P,)
    unjudged = torch.cat([torch.isnan(greedy).flatten(), torch.isnan(rewards).flatten()])
    return {"eval/accuracy": _judged_mean((greedy >= 1.0).float().masked_fill(torch.isnan(greedy), float("nan"))),
            "eval/pass@1": _judged_mean(rewards), "eval/pass@G": _judged_mean(solved), "eval/G": float(n),
            "eval/infra_error_frac": float(unjudged.float().mean())}


def _judged_mean(values: torch.Tensor) -> float:
    """The mean of the non-NaN entries (0.0 when there are none)."""
    judged = values[~torch.isnan(values)]
    return float(judged.mean()) if judged.numel() else 0.0

