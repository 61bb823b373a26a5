"""The supervised stages (pretrain, SFT): task source -> batches -> LearnerGroup, with runs that resume.

Pretrain packs whole task documents into fixed-length rows and trains NLL on every token; SFT
trains NLL on the response tokens of (prompt, demonstration) pairs through `loss_mask`. Both run
through the same DeepSpeed `LearnerGroup`, the same checkpoints and the same metrics as RL.

A run lives in `runs/<name>/<stage>/`: `config.yaml` (resolved), `metrics.jsonl`, `tb/`,
`checkpoints/step_N/` (atomic), and `final/hf` (an HF export loadable by transformers and vLLM).
Batches are a pure function of the task-source state, which each checkpoint stores, so a resumed run
reproduces the losses of an uninterrupted one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint
from engine.config import AssayConfig, to_yaml
from engine.data import encode_response, pack_pretrain, sft_batch
from engine.evaluate import greedy_accuracy
from engine.metrics import MetricsSink
from engine.models import prepare_model_dir
from engine.ray_cluster import init_ray
from engine.tasks import TaskSource, load_task_source
from learner.group import LearnerGroup


@dataclass(frozen=True)
class StageResult:
    run_dir: Path
    export_dir: Path
    steps: int
    metrics: dict[str, float]


def run_dir_of(cfg: AssayConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.name / cfg.stage


def run_stage(cfg: AssayConfig) -> StageResult:
    """Train one supervised stage to `cfg.steps`, resuming from the latest checkpoint if asked."""
    run_dir = run_dir_of(cfg)
    resume_from = checkpoint.latest(run_dir / "checkpoints") if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"[assay] resume=true but {run_dir / 'checkpoints'} has no complete checkpoint: starting fresh")
    if resume_from is None and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))

    source = load_task_source(cfg.task.source, cfg.task, cfg.seed)
    model_dir = _model_dir(cfg, source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
    group = LearnerGroup(cfg.learner, str(model_dir), cfg.cluster.learners, total_steps=cfg.steps)
    start = 0
    if resume_from is not None:
        state = checkpoint.read_state(resume_from)
        group.load(str(resume_from / "learner"))
        source.load_state_dict(state["task_source"])
        checkpoint.set_rng_state(state["rng"])
        start = int(state["step"])
        print(f"[assay] resumed {run_dir} from {resume_from.name} (step {start})")

    next_batch = BATCHES[cfg.stage]
    sink = MetricsSink(run_dir, cfg.steps, start_step=start, progress=cfg.progress)
    metrics: dict[str, float] = {}
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch = next_batch(source, tokenizer, cfg)
            metrics = group.train_step(batch)
            metrics["perf/step_s"] = time.perf_counter() - t0
            done = step + 1
            if done == cfg.steps or cfg.eval_every and done % cfg.eval_every == 0:
                metrics.update(_evaluate(group, model_dir, tokenizer, source, cfg))
            if done % cfg.log_every == 0 or done == cfg.steps:
                sink.log(done, metrics)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                _save(run_dir, group, source, done, cfg.keep_checkpoints)
            sink.advance()
        export = _export(run_dir, group, source, cfg)
    finally:
        sink.close()
        group.shutdown()
    return StageResult(run_dir, export, cfg.steps, metrics)


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


# Stage -> batch builder. The loop never branches on the stage name.
BATCHES: dict[str, Callable[[TaskSource, Any, AssayConfig], dict[str, torch.Tensor]]] = {
    "pretrain": pretrain_batch,
    "sft": sft_step_batch,
}


def _model_dir(cfg: AssayConfig, source: TaskSource) -> Path:
    previous = Path(cfg.runs_dir) / cfg.name / "pretrain" / "final" / "hf"
    if cfg.model.path is None and cfg.stage == "sft" and cfg.init_from_previous_stage and previous.is_dir():
        print(f"[assay] sft starts from this run's pretrain export {previous}")
        return previous
    return prepare_model_dir(cfg.model, source.corpus(cfg.corpus_docs), Path(cfg.runs_dir) / cfg.name / "model")


def _evaluate(group: LearnerGroup, model_dir: Path, tokenizer: Any, source: TaskSource,
              cfg: AssayConfig) -> dict[str, float]:
    tasks = source.eval_tasks(cfg.task.eval_size)
    return greedy_accuracy(model_dir, group.state_dict_for_rollout(), tokenizer, tasks, max_new_tokens=cfg.max_len)


def _save(run_dir: Path, group: LearnerGroup, source: TaskSource, step: int, keep: int) -> Path:
    checkpoints = run_dir / "checkpoints"

    def write(tmp: Path) -> None:
        group.save(str(tmp / "learner"))
        checkpoint.write_state(tmp, {"step": step, "task_source": source.state_dict(),
                                     "rng": checkpoint.rng_state()})

    path = checkpoint.write_atomic(checkpoint.step_dir(checkpoints, step), write)
    checkpoint.prune(checkpoints, keep)
    return path


def _export(run_dir: Path, group: LearnerGroup, source: TaskSource, cfg: AssayConfig) -> Path:
    """The final checkpoint: learner state plus `final/hf`, the export later stages and users load."""

    def write(tmp: Path) -> None:
        group.save(str(tmp))
        checkpoint.write_state(tmp, {"step": cfg.steps, "task_source": source.state_dict(),
                                     "rng": checkpoint.rng_state()})

    final = checkpoint.write_atomic(run_dir / "final", write)
    return final / "hf"
