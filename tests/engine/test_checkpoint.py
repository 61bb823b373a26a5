"""Atomic checkpoint directories: a crash mid-write never hides or damages the previous checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _write_files(payload: str):
    def write(tmp: Path) -> None:
        (tmp / "weights.bin").write_text(payload)
        checkpoint.write_state(tmp, {"step": int(payload)})

    return write


def test_latest_picks_the_newest_complete(tmp_path: Path) -> None:
    for step in (3, 12, 6):
        checkpoint.write_atomic(checkpoint.step_dir(tmp_path, step), _write_files(str(step)))
    (tmp_path / "step_000099").mkdir()  # no state.json: incomplete, never a candidate
    assert checkpoint.latest(tmp_path) == tmp_path / "step_000012"


def test_exception_mid_write_leaves_previous(tmp_path: Path) -> None:
    checkpoint.write_atomic(checkpoint.step_dir(tmp_path, 1), _write_files("1"))

    def half_then_fail(tmp: Path) -> None:
        (tmp / "weights.bin").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoint .*step_000002: OSError: disk full"):
        checkpoint.write_atomic(checkpoint.step_dir(tmp_path, 2), half_then_fail)
    assert checkpoint.latest(tmp_path) == tmp_path / "step_000001"
    assert checkpoint.read_state(tmp_path / "step_000001") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # the temp dir is gone


def test_killed_process_mid_write_leaves_previous(tmp_path: Path) -> None:
    # A real crash: a process SIGKILLs itself halfway through writing checkpoint 2.
    checkpoint.write_atomic(checkpoint.step_dir(tmp_path, 1), _write_files("1"))
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from engine import checkpoint
        def write(tmp):
            (tmp / "weights.bin").write_text("x" * 100000)
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.write_atomic(checkpoint.step_dir(Path({str(tmp_path)!r}), 2), write)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.latest(tmp_path) == tmp_path / "step_000001"
    assert (tmp_path / "step_000001" / "weights.bin").read_text() == "1"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the half-written directory, ignored by latest() ...
    checkpoint.prune(tmp_path, keep=2)  # ... and removed by the next prune
    assert sorted(os.listdir(tmp_path)) == ["step_000001"]


def test_overwrite_replaces_whole_directory(tmp_path: Path) -> None:
    final = tmp_path / "final"
    checkpoint.write_atomic(final, _write_files("1"))
    (final / "stale.txt").write_text("from the first write")
    checkpoint.write_atomic(final, _write_files("2"))
    assert sorted(os.listdir(final)) == ["checksums.json", "state.json", "weights.bin"]


def test_prune_keeps_newest(tmp_path: Path) -> None:
    for step in range(1, 6):
        checkpoint.write_atomic(checkpoint.step_dir(tmp_path, step), _write_files(str(step)))
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_000004", "step_000005"]


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np
    import torch

    state = checkpoint.rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def test_unreadable_state_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="state.json"):
        checkpoint.read_state(tmp_path)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path: Path, capsys) -> None:
    for step in (1, 2):
        checkpoint.write_atomic(checkpoint.step_dir(tmp_path, step), _write_files(str(step)))
    assert checkpoint.damage(tmp_path / "step_000002") is None
    (tmp_path / "step_000002" / "weights.bin").write_text("3")  # one flipped byte, same size
    assert checkpoint.latest(tmp_path) == tmp_path / "step_000002"  # complete, but ...
    assert checkpoint.latest_loadable(tmp_path) == tmp_path / "step_000001"  # ... not loadable
    warning = capsys.readouterr().err
    assert "step_000002" in warning and "weights.bin: checksum mismatch" in warning
    (tmp_path / "step_000001" / "weights.bin").unlink()
    assert checkpoint.latest_loadable(tmp_path) is None
    assert "weights.bin: No such file" in capsys.readouterr().err


def test_a_full_disk_says_so_with_the_path(tmp_path: Path) -> None:
    """A real full filesystem: a 1 MiB tmpfs (mounting needs root; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    if subprocess.run(mount, check=False, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        def fill(tmp: Path) -> None:
            (tmp / "weights.bin").write_bytes(b"\0" * (2 << 20))

        with pytest.raises(checkpoint.CheckpointError) as err:
            checkpoint.write_atomic(checkpoint.step_dir(disk / "checkpoints", 1), fill)
        assert "No space left on device" in str(err.value) and "step_000001" in str(err.value)
        assert list((disk / "checkpoints").iterdir()) == []  # the partial write is gone
    finally:
        subprocess.run(["umount", str(disk)], check=False)

