"""`engine.ahead.Ahead`, the rollout thread of the RL loop: its staleness gate, order, errors, stop."""

from __future__ import annotations

import threading
import time

import pytest

from engine.ahead import Ahead


def run_loop(max_staleness: int, steps: int = 5) -> list[tuple[int, int]]:
    """Drive `Ahead` like the RL loop: take step j, "train" it, report it finished. Returns, per step,
    (step, steps finished when its production started)."""
    started: list[tuple[int, int]] = []
    done = [0]
    lock = threading.Lock()

    def produce(step: int) -> int:
        with lock:
            started.append((step, done[0]))
        return step * 10

    ahead = Ahead(produce, 0, steps, max_staleness)
    try:
        for step in range(steps):
            assert ahead.get(step) == step * 10
            time.sleep(0.02)  # the update: long enough for a thread that may run ahead to do so
            with lock:
                done[0] = step + 1
            ahead.finished(step + 1)
    finally:
        ahead.close()
    return started


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_production_never_runs_more_than_max_staleness_ahead(max_staleness: int) -> None:
    started = run_loop(max_staleness)
    assert [step for step, _ in started] == list(range(5))  # in order, each once
    assert all(step - finished <= max_staleness for step, finished in started)
    # and it does run ahead as far as allowed (the loop's update sleeps, the production does not)
    assert max(step - finished for step, finished in started) == max_staleness


def test_an_error_in_production_reaches_the_driver() -> None:
    def produce(step: int) -> int:
        if step == 1:
            raise ValueError("verifier pool died")
        return step

    ahead = Ahead(produce, 0, 3, max_staleness=1)
    try:
        assert ahead.get(0) == 0
        with pytest.raises(ValueError, match="verifier pool died"):
            ahead.get(1)
        with pytest.raises(RuntimeError, match="stopped before producing step 3"):
            ahead.get(2)
    finally:
        ahead.close()


def test_close_stops_a_thread_waiting_at_the_gate() -> None:
    ahead = Ahead(lambda step: step, 0, 10, max_staleness=0)
    assert ahead.get(0) == 0  # step 1 now waits for finished(1), which never comes
    ahead.close()
    assert not ahead._thread.is_alive()
    with pytest.raises(ValueError, match="rl.max_staleness"):
        Ahead(lambda step: step, 0, 1, max_staleness=-1)
