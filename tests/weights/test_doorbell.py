"""The `shm` weight doorbell (`weights.doorbell`): handles over a UNIX socket to a serving thread,
replies and errors back; and through a `RolloutGroup` of 2 real actors, a corrupt bucket refused
by the actor thread and raised in the driver."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from rollout.config import RolloutConfig
from rollout.group import RolloutGroup
from rollout.types import Sampling
from tests.rollout.conftest import (
    _PUBLISHERS,
    corrupt_first_bucket,
    make_tasks,
    perturbed_state,
    reference_logprobs,
    serve,
)
from weights import WeightHandle, WeightSyncError
from weights.doorbell import Doorbell, DoorbellServer


def open_bell(tmp_path: Path, handler) -> tuple[DoorbellServer, Doorbell]:
    server = DoorbellServer(str(tmp_path / "bell.sock"), handler)
    return server, Doorbell(server.path, "rollout actor 0")


def test_a_handle_goes_over_and_the_reply_comes_back(tmp_path):
    seen: list[WeightHandle] = []

    def handler(handle: WeightHandle) -> dict[str, float]:
        seen.append(handle)
        return {"rollout/weight_load_s": float(handle.version) / 10}

    server, bell = open_bell(tmp_path, handler)
    handles = [WeightHandle("shm", v, f"{v:016x}", f"/dev/shm/x/slot-{v % 2}", 3, 96) for v in (1, 2)]
    for handle in handles:
        bell.ring(handle)
        assert bell.answer() == {"rollout/weight_load_s": handle.version / 10}
    assert seen == handles  # every field arrives as it was sent
    assert (tmp_path / "bell.sock").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match=r"carries same-node handles \(shm\), not 'ray'"):
        bell.ring(WeightHandle("ray", 3, "00", None))
    bell.close()
    server.close()


def test_errors_come_back_as_errors_and_the_server_keeps_serving(tmp_path):
    def handler(handle: WeightHandle) -> dict[str, float]:
        if handle.version == 1:
            raise WeightSyncError("weight version 1 from slot-1 fails its checksum")
        if handle.version == 2:
            raise ValueError("the weights lack 1 tensor(s)")
        return {"ok": 1.0}

    server, bell = open_bell(tmp_path, handler)
    bell.ring(WeightHandle("shm", 1, "00", "slot-1"))
    with pytest.raises(WeightSyncError, match="weight version 1 from slot-1 fails its checksum"):
        bell.answer()
    bell.ring(WeightHandle("shm", 2, "00", "slot-0"))
    with pytest.raises(
        RuntimeError, match=r"rollout actor 0 failed to load the weights: ValueError: the weights lack"
    ):
        bell.answer()
    bell.ring(WeightHandle("shm", 3, "00", "slot-1"))
    assert bell.answer() == {"ok": 1.0}
    bell.close()
    server.close()


def test_a_closed_or_missing_doorbell_is_named(tmp_path):
    with pytest.raises(
        RuntimeError, match=r"rollout actor 3: cannot reach its weight doorbell .*weight_sync=ray"
    ):
        Doorbell(str(tmp_path / "none.sock"), "rollout actor 3")

    path = str(tmp_path / "dies.sock")  # an actor that dies mid-update: its end of the socket closes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def die() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.close()

    thread = threading.Thread(target=die)
    thread.start()
    bell = Doorbell(path, "rollout actor 0")
    bell.ring(WeightHandle("shm", 1, "00", "slot-1"))
    with pytest.raises(
        RuntimeError, match="rollout actor 0 closed its weight doorbell during a weight update"
    ):
        bell.answer()
    thread.join()
    bell.close()
    listener.close()


@pytest.mark.ray
@pytest.mark.slow
def test_a_group_rings_every_actor_and_a_corrupt_bucket_is_raised_here(ray_local, model_dir, tmp_path):
    cfg = RolloutConfig(backend="hf", max_model_len=128, weight_sync="shm", shm_dir=str(tmp_path))
    group = RolloutGroup(cfg, model_dir, num_workers=2)
    try:
        assert len(group.doorbells) == 2
        state = perturbed_state(model_dir, seed=11)
        metrics = serve(group, state, version=1)
        assert metrics["perf/weight_load_s"] > 0 and group.versions() == [1, 1]
        for r in group.generate(
            make_tasks(["What is 3+4?\n", "What is 9-2?\n"]), 1, Sampling(0.0, max_tokens=6)
        ):
            assert r.weight_version == 1
            expected = reference_logprobs(model_dir, r.prompt_ids, r.response_ids, state)
            assert r.rollout_logprobs == pytest.approx(expected, abs=1e-4)
        handle = _PUBLISHERS[group].publish(perturbed_state(model_dir, seed=12), 2)
        corrupt_first_bucket(handle.location)
        # what update_weights does after its publish; both actors refuse, and both replies are read
        with pytest.raises(WeightSyncError, match=r"weight version 2 from .* fails its checksum"):
            group.load_weights(handle)
        assert group.versions() == [1, 1]  # both still serve the last good version
        serve(group, perturbed_state(model_dir, seed=13), version=3)  # no stale reply in the way
        assert group.versions() == [3, 3]
        bell_dir = Path(group.doorbells[0].path).parent
    finally:
        group.shutdown()
    assert not bell_dir.exists()
