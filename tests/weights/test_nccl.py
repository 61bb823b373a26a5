"""The `nccl` transport's pieces on CPU (gloo): the device checksum, and a publisher and a receiver
in two threads of this process (the group is stateless: nothing global is touched)."""

from __future__ import annotations

import threading
import zlib

import pytest
import torch

from weights import WeightHandle, WeightSyncError
from weights.nccl import NcclWeightSync, device_checksum, free_port

pytest.importorskip("vllm")  # the stateless process group comes from vllm.distributed


def test_device_checksum_by_hand():
    # bits of int64 [1, 2] weighted by positions 1, 2: 1*1 + 2*2 = 5
    expected = zlib.crc32(b"w|torch.int64|(2,)|5")
    assert device_checksum({"w": torch.tensor([1, 2])}) == f"{expected:08x}"
    assert device_checksum({"w": torch.tensor([2, 1])}) != device_checksum({"w": torch.tensor([1, 2])})
    a = {"x": torch.randn(3), "y": torch.randn(3)}
    assert device_checksum(a) != device_checksum({"x": a["y"], "y": a["x"]})  # swapped tensors
    assert device_checksum({"x": torch.zeros(2, dtype=torch.bfloat16)}) != device_checksum(
        {"x": torch.zeros(2, dtype=torch.float16)}
    )


def _publish_in_thread(port: int, state: dict[str, torch.Tensor], version: int) -> threading.Thread:
    def run() -> None:
        publisher = NcclWeightSync()
        publisher.join("127.0.0.1", port, 0, 2, "cpu")
        publisher.publish(state, version)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_nccl_round_trip_and_version_check():
    state = {"a": torch.randn(4, 3), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(3)}
    port = free_port()
    thread = _publish_in_thread(port, state, 4)
    receiver = NcclWeightSync()
    receiver.join("127.0.0.1", port, 1, 2, "cpu")
    got = receiver.load(WeightHandle.expected("nccl", 4))
    thread.join(60)
    assert list(got) == ["a", "b", "c"]
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in state.items())

    port = free_port()
    thread = _publish_in_thread(port, state, 4)
    receiver = NcclWeightSync()
    receiver.join("127.0.0.1", port, 1, 2, "cpu")
    with pytest.raises(WeightSyncError, match=r"carried weight version 4, but version 5 was requested"):
        receiver.load(WeightHandle.expected("nccl", 5))
    thread.join(60)


def test_a_handle_with_another_checksum_is_refused_and_rank_roles_are_checked():
    state = {"a": torch.randn(4, 3)}
    port = free_port()
    thread = _publish_in_thread(port, state, 2)
    receiver = NcclWeightSync()
    receiver.join("127.0.0.1", port, 1, 2, "cpu")
    with pytest.raises(WeightSyncError, match=r"version 2 from the nccl broadcast fails its checksum: expected 0badc0de"):
        receiver.load(WeightHandle("nccl", 2, "0badc0de"))
    thread.join(60)
    with pytest.raises(WeightSyncError, match=r"rank 1 of the nccl weight group loads weights; rank 0 publishes"):
        receiver.publish(state, 3)
