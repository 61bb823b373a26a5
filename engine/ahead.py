"""Rollout ahead of the learner, by at most `rl.max_staleness` weight versions.

`Ahead` runs `produce(step)` (rollout + verification of one RL step) on a background thread, in step
order, while the driver's thread trains. Before producing step j it waits until the learner has
finished step j - max_staleness - 1 (`finished(j')` is called at the end of each step, after the new
weights are published, evaluation and checkpoint), so step j's samples come from weights at most
`max_staleness` versions older than those step j trains: with 0 this is the synchronous loop (the
next rollout starts only after the previous step is completely done), with 1 the rollout of step j + 1
overlaps the update of step j. Each step's result waits in a queue until the driver takes it.

An exception in `produce` is re-raised in the driver by `get`; `close` stops the thread (a step being
produced is finished or abandoned when the actors it calls are shut down).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any


class Ahead:
    """`produce(step)` for steps `start .. end - 1` on a thread, at most `max_staleness` steps ahead."""

    def __init__(self, produce: Callable[[int], Any], start: int, end: int, max_staleness: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"rl.max_staleness: expected >= 0, got {max_staleness}")
        self._produce, self._end, self._max_staleness = produce, end, max_staleness
        self._done = start  # steps the learner has finished (the version its weights carry)
        self._results: dict[int, tuple[bool, Any]] = {}  # step -> (ok, result or exception)
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, args=(start,), name="assay-rollout-ahead", daemon=True)
        self._thread.start()

    def _run(self, start: int) -> None:
        for step in range(start, self._end):
            with self._cond:
                self._cond.wait_for(functools.partial(self._may_start, step))
                if self._stopped:
                    return
            try:
                outcome: tuple[bool, Any] = (True, self._produce(step))
            except Exception as err:  # noqa: BLE001 -- handed to the driver's thread, which raises it
                outcome = (False, err)
            with self._cond:
                self._results[step] = outcome
                self._cond.notify_all()
            if not outcome[0]:
                return

    def _may_start(self, step: int) -> bool:
        return self._stopped or step - self._done <= self._max_staleness

    def get(self, step: int) -> Any:
        """Step `step`'s result (waits for it); re-raises the exception its production raised."""
        with self._cond:
            self._cond.wait_for(lambda: step in self._results or not self._thread.is_alive())
            if step not in self._results:
                raise RuntimeError(f"the rollout thread stopped before producing step {step + 1}")
            ok, value = self._results.pop(step)
        if not ok:
            raise value
        return value

    def finished(self, done: int) -> None:
        """The learner has finished `done` steps (its weights are version `done`)."""
        with self._cond:
            self._done = done
            self._cond.notify_all()

    def close(self) -> None:
        """Stop producing; waits for a step in progress only while its calls return."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
