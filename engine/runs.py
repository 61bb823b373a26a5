"""What every stage's run shares: its directory, the starting model, resume, checkpoints, the export.

A run lives in `runs/<name>/<stage>/`: `config.yaml` (resolved), `metrics.jsonl`, `tb/`,
`checkpoints/step_N/` (atomic; learner state + `state.json` with the step, the task-source position
and the driver RNG) and `final/` (the same plus `final/hf`, the HF export later stages and users load).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import checkpoint
from engine.config import AssayConfig, to_yaml
from engine.metrics import MetricsSink
from engine.models import prepare_model_dir
from engine.tasks import TaskSource

# Where a stage starts from when `model.path` is unset: the newest export of an earlier stage of the
# same run, in this order, else a freshly built tiny model.
EARLIER_STAGES = {"pretrain": (), "sft": ("pretrain",), "rl": ("sft", "pretrain")}


@dataclass(frozen=True)
class StageResult:
    run_dir: Path
    export_dir: Path
    steps: int
    metrics: dict[str, float]


def open_run(cfg: AssayConfig) -> tuple[Path, Path | None]:
    """Create (or, resuming, reuse) the stage's run directory; return it and the checkpoint to resume."""
    run_dir = Path(cfg.runs_dir) / cfg.name / (cfg.stage_dir or cfg.stage)
    resume_from = checkpoint.latest(run_dir / "checkpoints") if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"[assay] resume=true but {run_dir / 'checkpoints'} has no complete checkpoint: starting fresh")
    if resume_from is None and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir, resume_from


def starting_model(cfg: AssayConfig, source: TaskSource) -> Path:
    """`model.path`, else the export of `init_from` or of this run's newest earlier stage, else a tiny
    model built now."""
    if cfg.model.path is None and cfg.init_from is not None:
        export = Path(cfg.runs_dir) / cfg.name / cfg.init_from / "final" / "hf"
        if not export.is_dir():
            raise FileNotFoundError(f"init_from={cfg.init_from!r}: {export} does not exist (run that stage first)")
        return export
    if cfg.model.path is None and cfg.init_from_previous_stage:
        for stage in EARLIER_STAGES[cfg.stage]:
            export = Path(cfg.runs_dir) / cfg.name / stage / "final" / "hf"
            if export.is_dir():
                print(f"[assay] {cfg.stage} starts from this run's {stage} export {export}")
                return export
    return prepare_model_dir(cfg.model, source.corpus(cfg.corpus_docs), Path(cfg.runs_dir) / cfg.name / "model")


def resume(resume_from: Path, learner: Any, source: TaskSource) -> int:
    """Restore the learner, the task stream and the driver RNG; return the step to continue from."""
    state = checkpoint.read_state(resume_from)
    learner.load(str(resume_from / "learner"))
    source.load_state_dict(state["task_source"])
    checkpoint.set_rng_state(state["rng"])
    print(f"[assay] resumed from {resume_from} (step {state['step']})")
    return int(state["step"])


def save_step(run_dir: Path, learner: Any, source: TaskSource, step: int, keep: int) -> Path:
    """An atomic step checkpoint; older ones beyond `keep` are pruned."""
    checkpoints = run_dir / "checkpoints"
    path = checkpoint.write_atomic(checkpoint.step_dir(checkpoints, step),
                                   lambda tmp: _write(tmp / "learner", tmp, learner, source, step))
    checkpoint.prune(checkpoints, keep)
    return path


def finish_step(done: int, cfg: AssayConfig, metrics: dict[str, float], evaluate: Callable[[], dict[str, float]],
                sink: MetricsSink, run_dir: Path, learner: Any, source: TaskSource) -> None:
    """The end of every stage's step `done` (1-based): evaluate, log and checkpoint when due."""
    if done == cfg.steps or cfg.eval_every and done % cfg.eval_every == 0:
        metrics.update(evaluate())
    if done % cfg.log_every == 0 or done == cfg.steps:
        sink.log(done, metrics)
    if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
        save_step(run_dir, learner, source, done, cfg.keep_checkpoints)
    sink.advance()


def export_final(run_dir: Path, learner: Any, source: TaskSource, step: int) -> Path:
    """The final checkpoint (`final/`, with `final/hf`); returns the HF export's path."""
    final = checkpoint.write_atomic(run_dir / "final", lambda tmp: _write(tmp, tmp, learner, source, step))
    return final / "hf"


def _write(learner_dir: Path, state_dir: Path, learner: Any, source: TaskSource, step: int) -> None:
    learner.save(str(learner_dir))
    checkpoint.write_state(state_dir, {"step": step, "task_source": source.state_dict(),
                                       "rng": checkpoint.rng_state()})
