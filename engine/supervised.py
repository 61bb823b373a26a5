"""The offline stages (pretrain, SFT, DPO, RM): task source -> batches -> LearnerGroup, with runs that resume.

Pretrain packs whole task documents into fixed-length rows and trains NLL on every token; SFT
trains NLL on the response tokens of (prompt, demonstration) pairs through `loss_mask`; DPO trains a
preference loss on (prompt, chosen, rejected) pairs and RM a reward model on the same pairs
(`engine.preference`). All run through the same DeepSpeed `LearnerGroup`, the same checkpoints and
the same metrics as RL: one loop, and per stage a `Recipe` (its batches, its step, its evaluation)
from the table `RECIPES`.

A run lives in `runs/<name>/<stage>/`: `config.yaml` (resolved), `metrics.jsonl`, `tb/`,
`checkpoints/step_N/` (atomic), and `final/hf` (an HF export loadable by transformers and vLLM).
Batches are a pure function of the task-source state, which each checkpoint stores, so a resumed run
reproduces the losses of an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine import errors, stopping
from engine.config import AssayConfig
from engine.data import encode_response, pack_pretrain, sft_batch
from engine.evaluate import evaluate_tasks
from engine.metrics import MetricsSink
from engine.preference import dpo_recipe, require_pairs, rm_recipe
from engine.ray_cluster import init_ray
from engine.runs import Recipe, StageResult, export_final, finish_step, open_stage, resume, save_step
from engine.tasks import TaskSource
from learner.group import LearnerGroup


def run_stage(cfg: AssayConfig) -> StageResult:
    """Train one supervised stage to `cfg.steps`, resuming from the latest checkpoint if asked."""
    stage = open_stage(cfg, check_source=SOURCE_CHECKS.get(cfg.stage))
    run_dir, resume_from, source, model_dir = stage.run_dir, stage.resume_from, stage.source, stage.model_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
    group = LearnerGroup(cfg.learner, str(model_dir), cfg.cluster.learners, total_steps=cfg.steps)
    # before `resume`: a recipe may read the starting weights (DPO's reference log-probabilities)
    recipe = RECIPES[cfg.stage](cfg, group, source, tokenizer, model_dir, run_dir)
    start = resume(resume_from, group, source) if resume_from is not None else 0

    sink = MetricsSink(run_dir, cfg.steps, start_step=start, progress=cfg.progress)
    metrics: dict[str, float] = {}
    done = start
    try:
        stopping.check(done, lambda: None)  # a signal during start-up: nothing new to save
        while done < cfg.steps and not reached(metrics, cfg.stop_at_accuracy):
            errors.step_started(done + 1)
            t0 = time.perf_counter()
            metrics = recipe.train(recipe.batch())
            metrics["perf/step_s"] = time.perf_counter() - t0
            done += 1
            finish_step(done, cfg, metrics, lambda: recipe.evaluate(0), sink, run_dir, group, source)
            errors.step_finished()
            if done < cfg.steps:
                stopping.check(done, partial(save_step, run_dir, group, source, done, cfg.keep_checkpoints))
        if done < cfg.steps:
            print(f"[assay] {cfg.stage}: held-out accuracy {metrics['eval/accuracy']:.3f} reached "
                  f"stop_at_accuracy={cfg.stop_at_accuracy} at step {done}; stopping early")
            if done % cfg.log_every:  # finish_step logged it otherwise
                sink.log(done, metrics)
        # The stage's final evaluation adds sampled accuracy (G samples at T = 1), as the RL stage reports it.
        sink.log(done, recipe.evaluate(cfg.rollout.n))
        export = export_final(run_dir, group, source, done)
    finally:
        sink.close()
        group.shutdown()
    return StageResult(run_dir, export, done, metrics)


def reached(metrics: dict[str, float], threshold: float) -> bool:
    """True when an evaluation just measured held-out accuracy at or above `threshold` (> 0)."""
    return threshold > 0 and metrics.get("eval/accuracy", -1.0) >= threshold


def pretrain_batch(source: TaskSource, tokenizer: Any, cfg: AssayConfig) -> dict[str, torch.Tensor]:
    """`learner.batch_size` packed rows of `seq_len` tokens from whole task documents."""
    need = cfg.learner.batch_size * cfg.seq_len
    docs: list[str] = []
    have = 0
    while have < need:  # draw documents until they fill the batch (each is followed by one eos)
        fresh = [f"{t.prompt}{t.meta['response']}" for t in source.sample(cfg.learner.batch_size)]
        have += sum(len(encode_response(tokenizer, doc)) + 1 for doc in fresh)
        docs += fresh
    packed = pack_pretrain(docs, tokenizer, cfg.seq_len)
    return {k: v[: cfg.learner.batch_size] for k, v in packed.items()}  # (B, T) each


def sft_step_batch(source: TaskSource, tokenizer: Any, cfg: AssayConfig) -> dict[str, torch.Tensor]:
    """`learner.batch_size` (prompt, demonstration) pairs with the loss on response tokens only."""
    return sft_batch(source.sample(cfg.learner.batch_size), tokenizer, cfg.max_len)


def supervised_recipe(build: Callable[[TaskSource, Any, AssayConfig], dict[str, torch.Tensor]], cfg: AssayConfig,
                      group: LearnerGroup, source: TaskSource, tokenizer: Any, model_dir: Path, run_dir: Path) -> Recipe:
    """Pretrain or SFT: batches from `build`, the NLL step, the held-out greedy (and sampled) accuracy."""
    return Recipe(batch=lambda: build(source, tokenizer, cfg), train=group.train_step,
                  evaluate=lambda samples: evaluate_tasks(group, model_dir, tokenizer, source.eval_tasks(cfg.task.eval_size),
                                                          cfg, samples))


# Stage -> its recipe, built once the learner group exists. The loop never branches on the stage name.
RECIPES: dict[str, Callable[[AssayConfig, LearnerGroup, TaskSource, Any, Path, Path], Recipe]] = {
    "pretrain": partial(supervised_recipe, pretrain_batch),
    "sft": partial(supervised_recipe, sft_step_batch),
    "dpo": dpo_recipe,
    "rm": rm_recipe,
}
# Stage -> what it needs of the task source beyond the protocol, checked before the run directory opens.
SOURCE_CHECKS = {"dpo": require_pairs, "rm": require_pairs}
