"""What every stage's run shares: its directory, the starting model, resume, checkpoints, the export.

A run lives in `runs/<name>/<stage>/`: `config.yaml` (resolved), `metrics.jsonl`, `tb/`,
`checkpoints/step_N/` (atomic; learner state + `state.json` with the step, the task-source position,
the driver RNG and, in the RL stage, the collector's state) and `final/` (the same plus `final/hf`, the
HF export later stages and users load).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import checkpoint, errors
from engine.config import AssayConfig, to_yaml
from engine.metrics import MetricsSink
from engine.models import check_weights, prepare_model_dir
from engine.tasks import TaskSource, load_task_source
from engine.tasks.files import TaskFileError

# Where a stage starts from when `model.path` is unset: the newest export of an earlier stage of the
# same run, in this order, else a freshly built tiny model.
EARLIER_STAGES = {"pretrain": (), "sft": ("pretrain",), "dpo": ("sft", "pretrain"), "rm": ("sft", "pretrain"),
                  "rl": ("dpo", "sft", "pretrain")}


@dataclass(frozen=True)
class Recipe:
    """What one offline stage (pretrain, SFT, DPO, RM) does inside the loop they share (`engine.supervised`)."""

    batch: Callable[[], dict[str, Any]]
    """The next training batch (advances the task source)."""
    train: Callable[[dict[str, Any]], dict[str, float]]
    """One optimizer step on a batch; its metrics."""
    evaluate: Callable[[int], dict[str, float]]
    """Held-out metrics; the argument is the samples per task at T = 1 to add (0: greedy only)."""


@dataclass(frozen=True)
class StageResult:
    run_dir: Path
    export_dir: Path
    steps: int
    metrics: dict[str, float]


class RunDirError(RuntimeError):
    """A stage directory that holds a user's work and would be overwritten; the message says what to pass."""


# What a run writes into its stage directory before it has anything worth keeping; a directory holding
# only these (no `final/`, no complete checkpoint) is a run that stopped before its first save.
_RUN_FILES = frozenset({"config.yaml", "metrics.jsonl", "tb", "placement.json", "checkpoints", "verifier.log",
                        "third_party.log", "reference_logps.pt"})


def stage_dir(cfg: AssayConfig) -> Path:
    """`runs_dir/<name>/<stage_dir or stage>`: where the stage writes."""
    return Path(cfg.runs_dir) / cfg.name / (cfg.stage_dir or cfg.stage)


def finished(run_dir: Path) -> bool:
    """True when the stage wrote its final export (`final/` is renamed into place only when complete)."""
    return (run_dir / "final" / checkpoint.STATE_FILE).is_file()


def open_run(cfg: AssayConfig) -> tuple[Path, Path | None]:
    """Create (or, resuming, reuse) the stage's run directory; return it and the checkpoint to resume.

    Call it only after every input is checked: it is the first write. Nothing a user has is deleted: a
    directory with a final export or checkpoints is resumed (`resume=true`), moved aside
    (`overwrite=true`, to `<stage>.old-<time>`) or refused with a message saying which to pass.
    """
    run_dir = stage_dir(cfg)
    resume_from = checkpoint.latest_loadable(run_dir / "checkpoints") if cfg.resume else None
    if resume_from is None and run_dir.exists():
        _clear_for_fresh_start(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir, resume_from


def _clear_for_fresh_start(run_dir: Path, cfg: AssayConfig) -> None:
    """Make room for a fresh run in `run_dir`, which exists: move it aside, or refuse, or (when it holds
    only the files of a run that stopped before saving anything) clear those files."""
    entries = {p.name for p in run_dir.iterdir()}
    valuable = finished(run_dir) or checkpoint.latest(run_dir / "checkpoints") is not None
    if cfg.overwrite and entries:
        aside = move_aside(run_dir)
        print(f"[assay] overwrite=true: moved the earlier {run_dir} aside to {aside}")
        return
    if cfg.resume and valuable:
        raise RunDirError(f"resume=true but {run_dir / 'checkpoints'} has no loadable checkpoint "
                          f"({'the stage finished: final/ holds its export' if finished(run_dir) else 'every one is damaged'}); "
                          "pass another name= or stage_dir=, or overwrite=true to move the old run aside")
    if valuable or entries - _RUN_FILES:
        what = "a finished run (final/)" if finished(run_dir) else (
            "checkpoints" if valuable else f"files Assay did not write ({', '.join(sorted(entries - _RUN_FILES))})")
        resume_hint = "" if finished(run_dir) or not valuable else "resume=true to continue it, "
        raise RunDirError(f"{run_dir} already holds {what}: pass {resume_hint}another name= or stage_dir= to keep "
                          "it, or overwrite=true to move it aside")
    if cfg.resume:
        print(f"[assay] resume=true: {run_dir} has no checkpoint yet; starting the stage from step 0")
    for name in entries:  # only what an earlier attempt wrote before its first checkpoint
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def move_aside(path: Path) -> Path:
    """Rename `path` to `<path>.old-<UTC time>` (never deleting it); return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
    path.rename(aside)
    return aside


@dataclass(frozen=True)
class Stage:
    """A stage whose inputs were all checked, and its run directory (opened last)."""

    run_dir: Path
    resume_from: Path | None
    source: TaskSource
    model_dir: Path


def open_stage(cfg: AssayConfig, verifiers: bool = False,
               check_source: Callable[[AssayConfig, TaskSource], None] | None = None) -> Stage:
    """Check every input — the task source (its files, and `check_source` when the stage needs more of it),
    the starting model (config against weights) and, with `verifiers`, that each verifier the held-out
    tasks name can be built — and only then open the run directory, so a typo costs nothing already written."""
    source = load_task_source(cfg.task.source, cfg.task, cfg.seed)
    if check_source is not None:
        check_source(cfg, source)
    model_dir = starting_model(cfg, source)
    check_weights(model_dir)
    if verifiers and cfg.verifier.endpoint:  # the service builds the verifiers: it must answer
        check_endpoint(cfg.verifier.endpoint, cfg.verifier.timeout_s)
    elif verifiers:  # the tasks' verifiers and the reward's other terms (`verifier.rewards`)
        names = {t.verifier for t in source.eval_tasks(cfg.task.eval_size)}
        names |= {term.verifier for term in cfg.verifier.rewards if term.verifier != "task"}
        built = check_verifiers(names, cfg.verifier.options)
        check_references(source, built, cfg.verifier.options)
    run_dir, resume_from = open_run(cfg)
    return Stage(run_dir, resume_from, source, model_dir)


def check_verifiers(names: set[str], options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Build each verifier once here, so an unknown name, a bad option or a missing sandbox stops the run
    before anything starts (the pool's workers build their own copies); returns them by name."""
    from verifiers import registry

    built = {}
    for name in sorted(names):
        try:
            built[name] = registry.load(name, **options.get(name, {}))
        except Exception as err:
            raise VerifierSetupError(f"verifier {name!r} cannot be built: {type(err).__name__}: {err}") from err
    return built


def check_references(source: TaskSource, built: dict[str, Any], options: dict[str, dict[str, Any]]) -> None:
    """For a source that lists its rows' references (`references()`: `(where, verifier, reference)`, as
    `task=file` does), have each row's verifier check its reference (`check_reference`, where the
    verifier has one), so a reference no verifier can read stops the run before training, naming its
    lines -- instead of a `bad_reference` verdict, a dropped sample, at every step it is drawn."""
    from verifiers import registry

    listed = getattr(source, "references", None)
    if listed is None:
        return
    bad: list[tuple[str, str]] = []
    total = 0
    for where, name, reference in listed():
        if name not in built:
            built[name] = registry.load(name, **options.get(name, {}))
        check = getattr(built[name], "check_reference", None)
        if check is None:
            continue
        total += 1
        why = check(reference)
        if why is not None:
            bad.append((where, why))
    bad.sort(key=lambda item: _file_line(item[0]))
    if bad:
        shown = "; ".join(f"{where}: {why}" for where, why in bad[:5]) + (f"; ... and {len(bad) - 5} more"
                                                                         if len(bad) > 5 else "")
        raise TaskFileError(f"{len(bad)} of {total} references cannot be read by their verifier, so their samples "
                            f"could never be scored: {shown} (fix or drop those rows; the math verifier's "
                            "verifier.options.math.reference=auto|whole|extract says how a reference is read)")


def check_endpoint(endpoint: str, timeout_s: float) -> None:
    """The verifier service at `endpoint` answers its health call, else one line naming it."""
    from verifiers.service import RemoteVerifierPool

    client = RemoteVerifierPool(endpoint, timeout_s)
    try:
        client.health()
    except Exception as err:  # noqa: BLE001 -- refused, unreachable, or not a verifier service
        raise VerifierSetupError(f"verifier.endpoint={endpoint}: {errors.one_line(err)}") from None
    finally:
        client.close()


def _file_line(where: str) -> tuple[str, int]:
    """`("data.jsonl", 17)` for `"data.jsonl:17"`, to list rows in file order."""
    path, _, line = where.rpartition(":")
    return (path, int(line)) if line.isdigit() else (where, 0)


class VerifierSetupError(RuntimeError):
    """A verifier named by the tasks or the config that cannot be built."""


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


class SourceAt:
    """The RL stage's data side right after a step's data was drawn — the task stream's position and the
    collector's state — which that step's checkpoint records, although the rollout thread may have drawn
    later steps' already. Stands in for the task source in `save_step`, `finish_step` and `export_final`."""

    def __init__(self, state: dict[str, Any], collector: dict[str, Any]) -> None:
        self.state, self.collector = state, collector

    def state_dict(self) -> dict[str, Any]:
        return self.state


def resume(resume_from: Path, learner: Any, source: TaskSource, collector: Any = None) -> int:
    """Restore the learner, the task stream, the RL stage's collector and the driver RNG; return the
    step to continue from."""
    state = checkpoint.read_state(resume_from)
    try:
        learner.load(str(resume_from / "learner"))
    except Exception as err:  # a raw torch/DeepSpeed error names neither the checkpoint nor the file
        cause = getattr(err, "cause", None) or err  # a Ray task error wraps the actor's exception
        text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise checkpoint.CheckpointError(f"cannot load checkpoint {resume_from / 'learner'}: "
                                         f"{type(cause).__name__}: {text}") from err
    source.load_state_dict(state["task_source"])
    if collector is not None and "collector" in state:  # (a checkpoint from before collectors kept state has none)
        collector.load_state_dict(state["collector"])
    checkpoint.set_rng_state(state["rng"])
    print(f"[assay] resumed from {resume_from} (step {state['step']})")
    return int(state["step"])


def save_step(run_dir: Path, learner: Any, source: TaskSource | SourceAt, step: int, keep: int) -> Path:
    """An atomic step checkpoint; older ones beyond `keep` are pruned."""
    checkpoints = run_dir / "checkpoints"
    path = checkpoint.write_atomic(checkpoint.step_dir(checkpoints, step),
                                   lambda tmp: _write(tmp / "learner", tmp, learner, source, step))
    checkpoint.prune(checkpoints, keep)
    return path


def finish_step(done: int, cfg: AssayConfig, metrics: dict[str, float], evaluate: Callable[[], dict[str, float]],
                sink: MetricsSink, run_dir: Path, learner: Any, source: TaskSource | SourceAt) -> None:
    """The end of every stage's step `done` (1-based): evaluate, log and checkpoint when due."""
    if done == cfg.steps or cfg.eval_every and done % cfg.eval_every == 0:
        metrics.update(evaluate())
    if done % cfg.log_every == 0 or done == cfg.steps:
        sink.log(done, metrics)
    if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
        save_step(run_dir, learner, source, done, cfg.keep_checkpoints)
    sink.advance()


def export_final(run_dir: Path, learner: Any, source: TaskSource | SourceAt, step: int) -> Path:
    """The final checkpoint (`final/`, with `final/hf`); returns the HF export's path."""
    final = checkpoint.write_atomic(run_dir / "final", lambda tmp: _write(tmp, tmp, learner, source, step))
    return final / "hf"


def _write(learner_dir: Path, state_dir: Path, learner: Any, source: TaskSource | SourceAt, step: int) -> None:
    learner.save(str(learner_dir))
    state = {"step": step, "task_source": source.state_dict(), "rng": checkpoint.rng_state()}
    if isinstance(source, SourceAt):
        state["collector"] = source.collector
    checkpoint.write_state(state_dir, state)
