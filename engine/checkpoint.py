"""Run-level checkpoints: atomic directories holding everything a run needs to continue.

A checkpoint is `checkpoints/step_000120/` with the learner's state (`learner/`: DeepSpeed state
for exact resume and an HF export), `state.json` (step, task-source state, RNG) and `checksums.json`
(XXH3-64 of every other file). It is written into a temporary sibling directory and renamed into
place only when complete, so a crash in the middle of a write leaves the previous checkpoint as the
latest loadable one. On resume the checksums are verified: a damaged checkpoint is named in a warning
and the previous complete one is used instead. A failed write says what failed, with the path, and
says so when the disk is full.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

STATE_FILE = "state.json"
CHECKSUMS_FILE = "checksums.json"
_LOW_DISK_BYTES = 64 << 20  # a failed write with less free space than this is reported as a full disk


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path and the cause."""
_PREFIX = "step_"


def write_atomic(final_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then rename `tmp_dir` to `final_dir`; on any failure remove `tmp_dir`."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        write_checksums(tmp)
        _fsync_dir(tmp)
        if final_dir.exists():
            old = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
            final_dir.rename(old)
            tmp.rename(final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final_dir)
        _fsync_dir(final_dir.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, CheckpointError):
            raise CheckpointError(_write_failure(final_dir, err)) from err
        raise
    return final_dir


def _write_failure(final_dir: Path, err: Exception) -> str:
    """One line for a failed checkpoint write: the path, and "no space left" when that is the cause (a
    write inside a DeepSpeed or torch call often says only `basic_ios::clear: iostream error`)."""
    cause = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    try:
        free = shutil.disk_usage(final_dir.parent).free
    except OSError:
        free = None
    if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < _LOW_DISK_BYTES):
        left = f"{free / 2**20:.1f} MiB left" if free is not None else "no space left"
        return f"cannot write checkpoint {final_dir}: No space left on device ({left}; {cause})"
    return f"cannot write checkpoint {final_dir}: {type(err).__name__}: {cause}"


def write_checksums(directory: Path) -> None:
    """Record the XXH3-64 of every file under `directory` in `checksums.json`."""
    sums = {str(p.relative_to(directory)): _file_hash(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS_FILE}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=0, sort_keys=True))


def damage(directory: Path) -> str | None:
    """None when every file `checksums.json` lists is there with its recorded hash, else what is wrong
    (a checkpoint written before checksums were recorded has none to check and passes)."""
    listing = directory / CHECKSUMS_FILE
    if not listing.is_file():
        return None
    try:
        sums = json.loads(listing.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{listing}: unreadable ({err})"
    for name, expected in sums.items():
        path = directory / name
        try:
            actual = _file_hash(path)
        except OSError as err:
            return f"{path}: {err.strerror or err}"
        if actual != expected:
            return f"{path}: checksum mismatch (recorded {expected}, found {actual})"
    return None


def _file_hash(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"{_PREFIX}{step:06d}"


def latest(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (temporary and partial directories are never candidates)."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name[len(_PREFIX):]), default=None)


def latest_loadable(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; each damaged newer one is
    named in a warning and skipped."""
    if not checkpoints.is_dir():
        return None
    done = sorted((p for p in checkpoints.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()),
                  key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)
    for path in done:
        problem = damage(path)
        if problem is None:
            return path
        print(f"[assay] warning: checkpoint {path} is damaged ({problem}); trying the previous one", file=sys.stderr)
    return None


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
        raise CheckpointError(f"{path}: cannot read checkpoint state ({err})") from err


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
