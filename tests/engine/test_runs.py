"""`engine.runs`: a stage directory that holds a user's work is never deleted, and every input is
checked before the directory is touched. No Ray: the directories are laid out by hand the way a
finished or interrupted run leaves them (`final/state.json`, `checkpoints/step_N/state.json`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import checkpoint
from engine.config import compose_config
from engine.runs import RunDirError, open_run, open_stage
from engine.tasks.files import TaskFileError


def _cfg(runs: Path, *overrides: str):
    return compose_config(["experiment=arith_tiny", "stage=pretrain", f"runs_dir={runs}", *overrides])


def _finished_run(runs: Path) -> Path:
    """A stage directory as a finished run leaves it: final export, metrics, one step checkpoint."""
    run_dir = runs / "arith_tiny" / "pretrain"
    checkpoint.write_atomic(run_dir / "final", lambda tmp: checkpoint.write_state(tmp, {"step": 60}))
    (run_dir / "final" / "model.safetensors").write_bytes(b"weights")
    checkpoint.write_atomic(checkpoint.step_dir(run_dir / "checkpoints", 50),
                            lambda tmp: checkpoint.write_state(tmp, {"step": 50}))
    (run_dir / "metrics.jsonl").write_text('{"step": 60}\n')
    return run_dir


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_rerunning_a_finished_stage_refuses_and_keeps_everything(tmp_path: Path) -> None:
    run_dir = _finished_run(tmp_path)
    before = _tree(run_dir)
    with pytest.raises(RunDirError, match=r"pretrain already holds a finished run \(final/\).*overwrite=true"):
        open_run(_cfg(tmp_path))
    assert _tree(run_dir) == before


def test_a_typo_in_the_task_path_fails_before_the_run_directory_is_touched(tmp_path: Path) -> None:
    run_dir = _finished_run(tmp_path)
    before = _tree(run_dir)
    cfg = _cfg(tmp_path, "task=file", f"task.file.path={tmp_path}/tasks.jsonnl", "overwrite=true")
    with pytest.raises(TaskFileError, match="tasks.jsonnl"):
        open_stage(cfg)
    assert _tree(run_dir) == before  # not even moved aside: overwrite acts only once the inputs are good
    assert [p.name for p in run_dir.parent.iterdir()] == ["pretrain"]


def test_resume_with_nothing_loadable_is_an_error_and_keeps_the_files(tmp_path: Path) -> None:
    run_dir = _finished_run(tmp_path)
    (run_dir / "checkpoints" / "step_000050" / "state.json").write_text("{}")  # damaged: checksum mismatch
    before = _tree(run_dir)
    with pytest.raises(RunDirError, match="resume=true but .*checkpoints has no loadable checkpoint"):
        open_run(_cfg(tmp_path, "resume=true"))
    assert _tree(run_dir) == before


def test_overwrite_moves_the_old_run_aside(tmp_path: Path, capsys) -> None:
    run_dir = _finished_run(tmp_path)
    before = _tree(run_dir)
    opened, resume_from = open_run(_cfg(tmp_path, "overwrite=true"))
    assert opened == run_dir and resume_from is None
    assert _tree(run_dir) == ["config.yaml"]
    (aside,) = [p for p in run_dir.parent.iterdir() if p.name.startswith("pretrain.old-")]
    assert _tree(aside) == before
    assert str(aside) in capsys.readouterr().out


def test_resume_continues_from_the_newest_loadable_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "arith_tiny" / "pretrain"
    for step in (2, 4):
        checkpoint.write_atomic(checkpoint.step_dir(run_dir / "checkpoints", step),
                                lambda tmp, s=step: checkpoint.write_state(tmp, {"step": s}))
    assert open_run(_cfg(tmp_path, "resume=true"))[1] == run_dir / "checkpoints" / "step_000004"


def test_a_run_that_stopped_before_its_first_checkpoint_is_started_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "arith_tiny" / "pretrain"
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    for overrides in ((), ("resume=true",)):  # resume=true with no checkpoint yet starts from step 0
        assert open_run(_cfg(tmp_path, *overrides)) == (run_dir, None)
        assert _tree(run_dir) == ["config.yaml"]


def test_files_assay_did_not_write_are_never_cleared(tmp_path: Path) -> None:
    run_dir = tmp_path / "arith_tiny" / "pretrain"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"files Assay did not write \(notes.txt\)"):
        open_run(_cfg(tmp_path))
    assert (run_dir / "notes.txt").read_text() == "mine"
