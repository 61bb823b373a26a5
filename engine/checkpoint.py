"""Run-level checkpoints: atomic directories holding everything a run needs to continue.

A checkpoint is `checkpoints/step_000120/` with the learner's state (`learner/`: DeepSpeed state
for exact resume and an HF export) and `state.json` (step, task-source state, RNG). It is written
into a temporary sibling directory and renamed into place only when complete, so a crash in the
middle of a write leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.json"
_PREFIX = "step_"


def write_atomic(final_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then rename `tmp_dir` to `final_dir`; on any failure remove `tmp_dir`."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        if final_dir.exists():
            old = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
            final_dir.rename(old)
            tmp.rename(final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final_dir)
        _fsync_dir(final_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"{_PREFIX}{step:06d}"


def latest(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (temporary and partial directories are never candidates)."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name[len(_PREFIX):]), default=None)


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints, and any leftovers of interrupted writes."""
    done = sorted((p for p in checkpoints.iterdir() if p.name.startswith(_PREFIX)), key=lambda p: p.name)
    for old in done[:-keep] if keep > 0 else done:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_state(directory: Path, state: dict[str, Any]) -> None:
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError(f"{path}: cannot read checkpoint state ({err})") from err


def rng_state() -> dict[str, Any]:
    """Driver-side RNG state as JSON-serialisable data."""
    return {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
