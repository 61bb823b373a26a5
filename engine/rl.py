"""The RL stage (synchronous GRPO-family loop): the diagram of DESIGN.md §2, top to bottom.

    tasks -> RolloutGroup (G responses each) -> verifier actors (a Verdict each) -> advantages
          -> LearnerGroup.train_rl_step -> weights published to the rollout actors -> metrics

Every algorithm difference is a table entry or a number picked by config (`rl.advantage` in
`learner.algos.ESTIMATORS`, `learner.policy_loss`, `learner.aggregation`, `learner.kl_coef`,
`learner.kl_reward_coef`, `learner.critic`, DAPO's `rl.dynamic_sampling` / `rl.overlong_buffer` /
`rl.mask_truncated`), never an `if algo == ...` here. Between rollout and update the learner scores the
batch once (`LearnerGroup.prepare`: old logprobs, reference logprobs when a KL term needs them, the
critic's values for PPO); the driver turns rewards into per-token rewards (minus the KL penalty) and
advantages (and GAE returns), and hands the lot back to `train_rl_step`.
Samples a verifier cannot judge (`score=None`) are dropped: their tokens leave `loss_mask` and their
reward is left out of the group statistics.
"""

from __future__ import annotations

import importlib
import sys
import time
from contextlib import ExitStack, closing
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from engine import errors, stopping
from engine.ahead import Ahead
from engine.config import AssayConfig
from engine.metrics import MetricsSink
from engine.placement import place
from engine.ray_cluster import init_ray
from engine.runs import StageResult, export_final, finish_step, open_stage, resume, save_step
from engine.scoring import score_on_actors, start_verifier_actors, step_verifier_metrics
from engine.tasks import Task
from learner.algos import ESTIMATORS, informative_groups, kl_k1, overlong_penalty, token_rewards
from learner.group import LearnerGroup
from rollout.group import RolloutGroup
from rollout.types import Response
from rollout.worker import sampling_from_config
from verifiers import Verdict


def run_rl(cfg: AssayConfig) -> StageResult:
    """Train `cfg.steps` RL steps from the run's latest earlier-stage export (or `model.path`)."""
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
        placement.record(run_dir, learner.actors, rollout.actors)
        scorers = start_verifier_actors(cfg.verifier, cfg.rl.verifier_actors, log_path=run_dir / "verifier.log")
        cleanup.callback(lambda: [actor.close.remote() for actor in scorers])
        start = resume(resume_from, learner, source) if resume_from is not None else 0
        if start:  # the rollout actors load the resumed weights
            rollout.update_weights(learner.state_dict_for_rollout(), version=start)
        eval_tasks = source.eval_tasks(cfg.task.eval_size)
        sink = cleanup.enter_context(closing(MetricsSink(run_dir, cfg.steps, start_step=start,
                                                         progress=cfg.progress)))
        if start == 0:  # the baseline the curves start from
            sink.log(0, evaluate(rollout, scorers, eval_tasks, cfg))

        collect_step = collector(cfg.rl.collector)

        def produce(step: int) -> tuple[list[Response], torch.Tensor, dict[str, float], SourceAt]:
            return *collect_step(source, rollout, scorers, cfg, step), SourceAt(source.state_dict())

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
                batch |= learner.prepare(batch)  # old logprobs (+ reference logprobs, critic values)
                metrics.update(add_advantages(batch, rewards, cfg))
                metrics.update(learner.train_rl_step(batch))
            t3 = time.perf_counter()
            metrics.update(rollout.update_weights(learner.state_dict_for_rollout(), version=step + 1))
            t4 = time.perf_counter()
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
        finish = getattr(sys.modules[collect_step.__module__], "finish", None)  # a collector's own report
        if finish is not None:
            finish(run_dir)
    return StageResult(run_dir, export, cfg.steps, metrics)


# `rl.collector`: what one step trains on, as `fn(source, rollout, scorers, cfg, step) -> (responses in
# group order, rewards (P, G), metrics)`; named by `module:function` so a collector may import this module.
# A collector's module may define `finish(run_dir)`, called after the stage's final export (its report).
COLLECTORS = {"tasks": "engine.rl:collect", "selfplay": "engine.selfplay:collect"}


def collector(name: str) -> Any:
    """The collector function `rl.collector` names (a key of COLLECTORS)."""
    module, _, function = COLLECTORS[name].partition(":")
    return getattr(importlib.import_module(module), function)


class SourceAt:
    """The task stream's position right after a step's tasks were drawn: what that step's checkpoint
    records, although the rollout thread may have drawn later steps' tasks already."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def collect(source: Any, rollout: RolloutGroup, scorers: list[Any], cfg: AssayConfig,
            step: int) -> tuple[list[Response], torch.Tensor, dict[str, float]]:
    """One step's training groups: responses `P'×G` in group order, shaped rewards `(P', G)` and the
    rollout metrics. Without `rl.dynamic_sampling` that is one round of `rl.prompts_per_step` prompts;
    with it, rounds of fresh prompts whose informative groups (rewards not all equal) are kept until
    `prompts_per_step` are, or `rl.max_sample_rounds` rounds are spent; then P' is the largest
    count whose samples fill whole minibatches (maybe 0: no update this step). The reward metrics are
    the first round's, an unfiltered sample of the policy. A group with a sample from weights more than
    `rl.max_staleness` versions older than step `step` trains (which `Ahead` already prevents) is
    dropped and counted (`rollout/stale_dropped`). The verifier counters are all rounds'
    (`engine.scoring.step_verifier_metrics`: infra errors per verifier, and the run's stop above
    `verifier.max_infra_error_frac`)."""
    n, want = cfg.rollout.n, cfg.rl.prompts_per_step
    kept: list[tuple[list[Response], torch.Tensor]] = []  # (G responses, (G,) rewards) per kept group
    metrics: dict[str, float] = {"perf/rollout_s": 0.0, "perf/verify_s": 0.0}
    rounds = cfg.rl.max_sample_rounds if cfg.rl.dynamic_sampling else 1
    drawn = informative = 0
    judged: list[tuple[Task, Verdict]] = []  # every verification of the step, for its verifier counters
    for round_ in range(rounds):
        t0 = time.perf_counter()
        tasks = source.sample(want)
        sampling = sampling_from_config(cfg.rollout, seed=_seed(cfg, step) + round_ * 7_919_000)
        responses = rollout.generate(tasks, n, sampling)
        t1 = time.perf_counter()
        scores, verdicts = score(scorers, tasks, responses, n)
        judged += verdicts
        rewards = shaped(scores, responses, cfg)  # (P, G)
        observe = getattr(source, "observe", None)  # a source that adapts to the verdicts (a curriculum)
        if observe is not None:
            metrics.update(observe(tasks, rewards))
        metrics["perf/rollout_s"] += t1 - t0
        metrics["perf/verify_s"] += time.perf_counter() - t1
        staleness = torch.tensor([step - r.weight_version for r in responses]).view(len(tasks), n)  # (P, G)
        if round_ == 0:
            metrics.update(rollout_metrics(responses, rewards))
            metrics.update({"rollout/staleness_mean": float(staleness.float().mean()),
                            "rollout/staleness_max": float(staleness.max()), "rollout/stale_dropped": 0.0})
        keep = informative_groups(rewards) if cfg.rl.dynamic_sampling else torch.ones(len(tasks), dtype=torch.bool)
        stale = (staleness > cfg.rl.max_staleness).any(1)  # (P,)
        metrics["rollout/stale_dropped"] += float(stale.sum())
        keep &= ~stale
        drawn, informative = drawn + len(tasks), informative + int(keep.sum())
        kept += [(responses[i * n:(i + 1) * n], rewards[i]) for i in range(len(tasks)) if keep[i]]
        if len(kept) >= want:
            break
    metrics.update(step_verifier_metrics(judged, step + 1, cfg.verifier.max_infra_error_frac))  # may stop the run
    usable = whole_minibatch_groups(min(len(kept), want), n, cfg.learner.batch_size)
    if usable < want:
        print(f"[assay] step {step + 1}: dynamic sampling found {len(kept)} of the {want} groups with mixed rewards "
              f"in {round_ + 1} rounds (rl.max_sample_rounds); training on {usable}"
              + ("" if usable else ": no update this step"))
    if cfg.rl.dynamic_sampling:
        metrics.update({"rollout/sample_rounds": float(round_ + 1), "rollout/informative_frac": informative / drawn,
                        "rollout/kept_groups": float(usable)})
    groups = kept[:usable]
    responses = [r for group, _ in groups for r in group]
    return responses, torch.stack([rw for _, rw in groups]) if groups else torch.zeros(0, n), metrics


def whole_minibatch_groups(groups: int, n: int, batch_size: int) -> int:
    """The most groups, at most `groups`, whose `n` samples each fill whole learner minibatches (maybe 0)."""
    while groups * n % batch_size:
        groups -= 1
    return groups


def shaped(rewards: torch.Tensor, responses: list[Response], cfg: AssayConfig) -> torch.Tensor:
    """Verifier rewards `(P, G)` plus DAPO's overlong penalty; NaN (left out) for truncated samples
    when `rl.mask_truncated`."""
    lengths = torch.tensor([len(r.response_ids) for r in responses]).view_as(rewards)
    rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_tokens, cfg.rl.overlong_buffer,
                                         cfg.rl.overlong_penalty)
    if cfg.rl.mask_truncated:
        cut = torch.tensor([r.finish_reason == "length" for r in responses]).view_as(rewards)
        rewards = rewards.masked_fill(cut, float("nan"))
    return rewards


def optimizer_steps(cfg: AssayConfig) -> int:
    """Optimizer steps of the whole stage: each RL step sweeps P×G sequences in minibatches, K times."""
    per_step = -(-cfg.rl.prompts_per_step * cfg.rollout.n // cfg.learner.batch_size)  # ceil
    return cfg.steps * per_step * cfg.learner.ppo_epochs


def score(scorers: list[Any], tasks: list[Task], responses: list[Response],
          n: int) -> tuple[torch.Tensor, list[tuple[Task, Verdict]]]:
    """Rewards `(prompts, samples)`, NaN where the verifier could not judge (an infra error), and the
    `(task, verdict)` of every verification made. Identical responses to one prompt are verified once:
    a sharpened policy repeats itself, and a sandboxed verification costs far more than the lookup (a
    verdict depends only on the text and the task)."""
    items = [(r.text, tasks[i // n]) for i, r in enumerate(responses)]
    assert all(r.task_id == t.id for r, (_, t) in zip(responses, items)), "responses out of task order"
    slot: dict[tuple[int, str], int] = {}  # (prompt index, text) -> index into `unique`
    unique: list[tuple[str, Task]] = []
    for i, item in enumerate(items):
        if (i // n, item[0]) not in slot:
            slot[(i // n, item[0])] = len(unique)
            unique.append(item)
    verdicts = score_on_actors(scorers, unique)
    scores = [float("nan") if (v := verdicts[slot[(i // n, text)]]).score is None else float(v.score)
              for i, (text, _) in enumerate(items)]
    judged = [(task, verdict) for (_, task), verdict in zip(unique, verdicts)]
    return torch.tensor(scores, dtype=torch.float32).view(len(tasks), n), judged  # (P, G)


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
    response's last token, minus `learner.kl_reward_coef` x k1(old, ref) on every response token, through
    the estimator `rl.advantage` names. Returns the reward-side metrics."""
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
    if kl is not None:
        metrics["rl/kl_to_ref"] = float((kl * mask).sum() / mask.sum().clamp(min=1))  # k1, token mean
    return metrics


def rollout_metrics(responses: list[Response], rewards: torch.Tensor) -> dict[str, float]:
    """Reward and length statistics of one step's samples (`rewards` is `(P, G)`). An unjudged sample
    (NaN) is left out: a group is all solved when every judged sample is, none solved when no judged
    sample is (a group with none judged is neither)."""
    unjudged = torch.isnan(rewards)  # (P, G)
    judged = rewards[~unjudged]
    solved = rewards >= 1.0  # (P, G), False where NaN
    any_judged = (~unjudged).any(1)  # (P,)
    lengths = torch.tensor([len(r.response_ids) for r in responses], dtype=torch.float32)
    return {
        "rollout/reward_mean": float(judged.mean()) if judged.numel() else 0.0,
        "rollout/reward_std": float(judged.std()) if judged.numel() > 1 else 0.0,
        "rollout/response_len": float(lengths.mean()),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in responses) / len(responses),
        "verifier/dropped_frac": float(torch.isnan(rewards).float().mean()),
        "task/all_solved_frac": float(((solved | unjudged).all(1) & any_judged).float().mean()),
        "task/none_solved_frac": float(((~solved).all(1) & any_judged).float().mean()),
    }


def evaluate(rollout: RolloutGroup, scorers: list[Any], tasks: list[Task], cfg: AssayConfig) -> dict[str, float]:
    """On the fixed eval set: greedy exact match (`eval/accuracy`, as the supervised stages report it),
    pass@1 (the mean score of G samples at the rollout temperature) and pass@G (any sample solved).
    Samples the verifier could not judge (infra errors) are left out of each, never counted as 0;
    `eval/infra_error_frac` is their share."""
    n = cfg.rollout.n
    sampling = sampling_from_config(cfg.rollout, seed=cfg.seed + 7919)
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


def _seed(cfg: AssayConfig, step: int) -> int:
    return cfg.seed * 1_000_003 + step

