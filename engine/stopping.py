"""Clean stops: SIGTERM and SIGINT end a run at a step boundary with a checkpoint, never mid-write.

The first signal only sets a flag (the handler does nothing else, so a checkpoint being written is
never interrupted). Each stage's loop calls `check(step, save)` after every step: with a signal pending it
writes a checkpoint through `save` and raises `Stopped`, which unwinds the stage's clean-ups (actors,
vLLM engines, verifier pools and their sandboxes), after which the command line stops Ray and exits
with 128 + the signal (130 for SIGINT, 143 for SIGTERM) and one line saying how to continue. A second
signal exits at once.

`ray.init` installs its own SIGTERM handler (a `sys.exit` that aborted the driver with SIGABRT
mid-step), so `install` runs again after Ray starts (`engine.ray_cluster.init_ray`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """A run stopped by a signal after step `step` (its checkpoint is `saved`, None when none was due)."""

    def __init__(self, step: int, signum: int, saved: Path | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum, self.saved = step, signum, saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_pending: int | None = None
_installed = False


def install() -> None:
    """Route SIGINT and SIGTERM to the flag (from the main thread; elsewhere a no-op)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        signal.signal(signum, _handle)
    _installed = True


def reinstall() -> None:
    """Take the signals back after a library (Ray) replaced the handlers, if `install` ran before."""
    if _installed:
        install()


def uninstall() -> None:
    """Default handlers again and no pending signal (tests, and the end of a command)."""
    global _pending, _installed
    if threading.current_thread() is threading.main_thread() and _installed:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _pending, _installed = None, False


def pending() -> int | None:
    """The signal received and not yet acted on, if any."""
    return _pending


def check(step: int, save: Callable[[], Path | None]) -> None:
    """After step `step`: with a signal pending, checkpoint through `save` and raise `Stopped`."""
    if _pending is not None:
        raise Stopped(step, _pending, save())


def _handle(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _pending is not None:  # the second signal: the user does not want to wait
        os.write(2, f"\n[assay] second {signal.Signals(signum).name}: exiting now without a checkpoint\n".encode())
        os._exit(128 + signum)
    _pending = signum
    print(f"\n[assay] {signal.Signals(signum).name}: stopping after the current step with a checkpoint "
          "(send it again to exit at once)", file=sys.stderr, flush=True)
