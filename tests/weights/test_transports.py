"""Weight transports: the table, round trips, bucketing, and clear errors for corrupt or mismatched
versions. (Loading published weights into a serving worker: tests/rollout/test_actor.py, test_group.py;
`nccl`'s broadcast: test_nccl.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import xxhash

from rollout.config import RolloutConfig
from weights import (
    TRANSPORTS,
    NcclWeightSync,
    RayWeightSync,
    ShmWeightSync,
    WeightHandle,
    WeightSpec,
    WeightSyncError,
    load_published,
    make_publisher,
    reader,
    recheck,
)
from weights.base import bucket_names, copy_one_thread, state_checksum
from weights.shm import mapped_safetensors


def small_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 4, generator=gen),  # 64 bytes
        "b.weight": torch.randn(8, generator=gen),  # 32 bytes
        "c.weight": torch.randn(2, 2, generator=gen).to(torch.bfloat16),  # 8 bytes
        "d.bias": torch.randn(16, generator=gen),  # 64 bytes
    }


def test_buckets_respect_the_byte_limit():
    # 64 | 32 + 8 (40 <= 64) | 64: a new bucket whenever the next tensor would pass 64 bytes
    assert bucket_names(small_state(), 64) == [["a.weight"], ["b.weight", "c.weight"], ["d.bias"]]
    assert bucket_names(small_state(), 10) == [["a.weight"], ["b.weight"], ["c.weight"], ["d.bias"]]
    assert bucket_names(small_state(), 2**20) == [["a.weight", "b.weight", "c.weight", "d.bias"]]


def test_checksum_sees_values_names_and_dtypes():
    state = small_state()
    base = state_checksum(state)
    assert base == state_checksum(dict(reversed(list(state.items()))))  # order-free
    # by hand: one empty-named 0-d float32 zero hashes the stream b"|torch.float32|()" + 4 zero bytes
    expected = xxhash.xxh3_64(b"|torch.float32|()\0\0\0\0").hexdigest()
    assert state_checksum({"": torch.tensor(0.0)}) == expected
    changed = {**state, "b.weight": state["b.weight"].clone()}
    changed["b.weight"][3] += 1e-6
    assert state_checksum(changed) != base
    assert state_checksum({**state, "a.weight": state["a.weight"].double()}) != base
    assert state_checksum({("z" if k == "a.weight" else k): v for k, v in state.items()}) != base


def test_shm_round_trip_keeps_dtypes_and_reuses_its_slots(tmp_path):
    sync = ShmWeightSync(str(tmp_path), bucket_bytes=64, keep=2)
    states = [{k: v + version for k, v in small_state().items()} for version in range(4)]
    handles = [sync.publish(states[v], v) for v in (1, 2, 3)]  # v3 rewrites v1's slot in place
    reader = ShmWeightSync(str(tmp_path))  # a reader needs nothing but the handle
    for handle in handles[1:]:
        loaded = reader.load(handle)
        assert loaded.keys() == small_state().keys()
        for name, tensor in states[handle.version].items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert handles[-1].num_tensors == 4 and handles[-1].num_bytes == 64 + 32 + 8 + 64
    assert sorted(p.name for p in sync.root.iterdir()) == ["slot-0", "slot-1"]
    with pytest.raises(WeightSyncError, match=r"slot-0 holds weight version 3, but version 1 was requested"):
        sync.load(handles[0])
    bigger = {**small_state(), "c.weight": torch.ones(3)}  # a new layout: the slot is written afresh
    assert torch.equal(reader.load(sync.publish(bigger, 4))["c.weight"], torch.ones(3))
    sync.close()
    assert not sync.root.exists()


def test_shm_checksum_is_xxh3_over_the_bucket_files_whole(tmp_path):
    sync = ShmWeightSync(str(tmp_path), bucket_bytes=64)
    for version in (1, 2, 3):  # written afresh, then rewritten in place
        handle = sync.publish({k: v + version for k, v in small_state().items()}, version)
        files = [Path(handle.location) / f"bucket-{i:04d}.safetensors" for i in range(3)]
        assert handle.checksum == xxhash.xxh3_64(b"".join(f.read_bytes() for f in files)).hexdigest()
    sync.close()


def test_shm_corrupt_bucket_fails_its_checksum(tmp_path):
    sync = ShmWeightSync(str(tmp_path), bucket_bytes=64)
    handle = sync.publish(small_state(), 7)
    bucket = Path(handle.location) / "bucket-0001.safetensors"
    data = bytearray(bucket.read_bytes())
    data[-1] ^= 0xFF  # flip the last byte of tensor data
    bucket.write_bytes(bytes(data))
    with pytest.raises(WeightSyncError, match=r"weight version 7 from .*slot-0 fails its checksum"):
        sync.load(handle)
    bucket.write_bytes(b"garbage")  # a damaged header
    with pytest.raises(WeightSyncError, match=r"bucket .*bucket-0001.safetensors is unreadable"):
        sync.load(handle)


def test_shm_load_maps_the_files_and_recheck_sees_a_rewrite_under_them(tmp_path):
    sync = ShmWeightSync(str(tmp_path), bucket_bytes=64, keep=1)  # one slot: every publish rewrites it
    first = {k: v + 1 for k, v in small_state().items()}
    handle = sync.publish(first, 1)
    loaded = sync.load(handle)
    for name, tensor in first.items():
        assert torch.equal(loaded[name], tensor)
    assert mapped_safetensors(Path(handle.location) / "bucket-0000.safetensors").keys() == {"a.weight"}
    recheck(handle)  # nothing changed: passes
    sync.publish(small_state(), 2)  # the publisher rewrites the slot in place under the views
    assert torch.equal(loaded["a.weight"], small_state()["a.weight"])  # the views see the new bytes
    with pytest.raises(
        WeightSyncError, match=r"version 1 .*re-read after the load.*rewritten during the load"
    ):
        recheck(handle)
    sync.close()


def test_shm_wrong_version_or_checksum_is_named(tmp_path):
    sync = ShmWeightSync(str(tmp_path))
    handle = sync.publish(small_state(), 2)
    manifest = Path(handle.location) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 1}))
    with pytest.raises(WeightSyncError, match=r"holds weight version 1, but version 2 was requested"):
        sync.load(handle)
    good = sync.publish(small_state(), 3)
    forged = WeightHandle("shm", 3, "00000000", good.location)
    with pytest.raises(WeightSyncError, match=r"expected 00000000, got [0-9a-f]{8}"):
        sync.load(forged)


def test_the_table_builds_each_configured_transport_and_says_what_it_needs(tmp_path):
    shm = make_publisher(RolloutConfig(weight_sync="shm", shm_dir=str(tmp_path), bucket_mb=3).weight_spec())
    assert isinstance(shm, ShmWeightSync) and (shm.shm_dir, shm.bucket_bytes) == (str(tmp_path), 3 * 2**20)
    assert isinstance(make_publisher(RolloutConfig(weight_sync="ray", bucket_mb=2).weight_spec()), RayWeightSync)
    assert isinstance(make_publisher(RolloutConfig(weight_sync="nccl").weight_spec()), NcclWeightSync)
    assert {name: (kind.same_node, kind.rendezvous) for name, kind in TRANSPORTS.items()} == {
        "shm": (True, False), "ray": (False, False), "nccl": (False, True)}
    with pytest.raises(ValueError, match=r"rollout.weight_sync='tcp' is not one of \['nccl', 'ray', 'shm'\]"):
        make_publisher(WeightSpec("tcp"))
    with pytest.raises(WeightSyncError, match=r"a nccl handle is loaded by the reader that joined"):
        reader("nccl")


@pytest.mark.ray
@pytest.mark.parametrize("name", ["shm", "ray"])
def test_each_stateless_transport_round_trips_a_state_with_version_and_checksum(name, tmp_path, ray_local):
    publisher = make_publisher(WeightSpec(name, bucket_bytes=64, shm_dir=str(tmp_path)))
    state = small_state()
    handle = publisher.publish(state, 7)
    assert (handle.transport, handle.version, handle.num_tensors) == (name, 7, 4)
    assert handle.num_bytes == 64 + 32 + 8 + 64
    loaded = load_published(handle)  # this process's reader, through the handle only
    assert list(loaded) == list(state) or sorted(loaded) == sorted(state)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in state.items())
    recheck(handle)  # nothing rewritten since
    with pytest.raises(WeightSyncError, match=r"version 8"):
        load_published(WeightHandle(name, 8, handle.checksum, handle.location))
    with pytest.raises(WeightSyncError, match=r"fails its checksum"):
        load_published(WeightHandle(name, 7, "0" * 16, handle.location))
    publisher.close()


@pytest.mark.ray
def test_ray_round_trip_and_checksum_error(ray_local):
    sync = RayWeightSync(bucket_bytes=64, keep=1)
    handle = sync.publish(small_state(), 4)
    assert len(handle.location) == 3

    @ray_local.remote(num_cpus=0)
    def load_elsewhere(h: WeightHandle) -> dict[str, torch.Tensor]:
        return RayWeightSync().load(h)

    loaded = ray_local.get(load_elsewhere.remote(handle))  # another process, through the handle only
    assert all(torch.equal(loaded[k], v) for k, v in small_state().items())
    with pytest.raises(
        WeightSyncError, match=r"weight version 4 from the Ray object store fails its checksum"
    ):
        sync.load(WeightHandle("ray", 4, "deadbeef", handle.location))
    with pytest.raises(WeightSyncError, match=r"holds weight version 4, but version 5 was requested"):
        sync.load(WeightHandle("ray", 5, handle.checksum, handle.location))
    sync.close()


def test_copy_one_thread_copies_views_converts_dtypes_and_names_a_shape_mismatch():
    fused = torch.zeros(6, 4)
    src = torch.arange(8.0).view(2, 4)
    copy_one_thread(fused[2:4], src)  # a row slice of a fused parameter, as the vLLM copy plan has
    assert torch.equal(fused[2:4], src) and fused[:2].abs().sum() == 0 and fused[4:].abs().sum() == 0
    half = torch.zeros(3, dtype=torch.bfloat16)
    copy_one_thread(half, torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16))
    assert half.tolist() == [1.5, -2.0, 3.25]
    copy_one_thread(half, torch.tensor([0.5, 1.0, -4.0]))  # fp32 into bf16: converted, as copy_ does
    assert half.tolist() == [0.5, 1.0, -4.0]
    with pytest.raises(ValueError, match=r"copy of shape \(4,\) into shape \(3,\)"):
        copy_one_thread(half, torch.zeros(4))
