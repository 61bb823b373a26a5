"""What every weight transport shares: the handle, the protocol, checksums, buckets, orphan clean-up.

A handle is small and picklable: it carries the version, a checksum of the whole state and where the
tensors are, so a Ray call (or, for `shm`, the `weights.doorbell` socket) can hand it to every
rollout actor. `load` takes the handle rather than a version (DESIGN.md §5's `load(version)`),
because the `ray` transport can only find its objects through the refs in it; the handle's version
is what `load` verifies.

The checksum is XXH3-64: for `ray`, streamed over every tensor's name, dtype, shape and bytes (in
name order, `state_checksum`); for `shm`, over the slot's bucket files whole, in bucket order
(`buffers_checksum`: each file's safetensors header names every tensor's dtype, shape and offsets,
and its data follows); `nccl` computes its own on the tensors' device (`weights.nccl`). It catches a
corrupted or mixed-up bucket, not a deliberate forgery. (Why XXH3 and one call per file:
docs/benchmarks.md, "Weight sync".)
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy
import torch
from torch import Tensor


class WeightSyncError(RuntimeError):
    """Published weights that cannot be loaded as the version they claim to be."""



@dataclass(frozen=True)
class WeightHandle:
    """Where published weights are and what they must verify as."""

    transport: str
    version: int
    checksum: str
    location: Any = None
    """`shm`: the version's directory (str); `ray`: the list of bucket ObjectRefs."""
    num_tensors: int = 0
    num_bytes: int = 0
    shareable: bool = False
    """`shm`: a reader may serve the slot's mapped bytes themselves (no copy) until its next load: the
    publisher keeps >= 2 slots, so the next publish goes to another slot than the one just handed out
    (see `ShmWeightSync`)."""

    @classmethod
    def expected(cls, transport: str, version: int) -> WeightHandle:
        """The handle a `rendezvous` reader loads with before the publish has made the real one: the
        version to expect; the checksum travels with the weights."""
        return cls(transport, version, "")



@dataclass(frozen=True)
class WeightSpec:
    """What a publisher is built from (`rollout.*` settings: `RolloutConfig.weight_spec()`)."""

    transport: str = "shm"
    bucket_bytes: int = 256 * 2**20
    shm_dir: str = "/dev/shm"
    keep: int = 2
    """Versions a publisher keeps readable (`shm` slots, pinned `ray` objects); >= 2 lets a reader
    serve an `shm` slot in place until its next load."""


class WeightSync(Protocol):
    """One transport: `publish` on learner rank 0, `load` in every rollout worker.

    The class attributes say what the transport needs, so no caller tests a transport's name:
    `same_node` -- readers must run on the publisher's node (and, for the doorbell, the driver's);
    `rendezvous` -- the publisher and every reader enter `publish` / `load` of a version together
    (after `join`), so the driver starts the readers' loads before the publish."""

    same_node: ClassVar[bool]
    rendezvous: ClassVar[bool]

    def publish(self, state: dict[str, Tensor], version: int) -> WeightHandle: ...

    def load(self, handle: WeightHandle) -> dict[str, Tensor]: ...

    def recheck(self, handle: WeightHandle) -> None:
        """After the tensors `load(handle)` returned were loaded: raise `WeightSyncError` if they could
        have changed since they were verified (`shm` views of a slot rewritten meanwhile)."""
        ...

    def close(self) -> None:
        """Free what this publisher still holds (files, pinned objects, a process group)."""
        ...


def state_checksum(state: dict[str, Tensor]) -> str:
    """XXH3-64 (16 hex digits) over each tensor's name, dtype, shape and bytes, in name order."""
    import xxhash

    digest = xxhash.xxh3_64()
    for name in sorted(state):
        tensor = state[name]
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:  # the bytes in place (`tensor` keeps them alive): half the cost of numpy views here
            digest.update((ctypes.c_char * nbytes).from_address(tensor.data_ptr()))
    return digest.hexdigest()


def bucket_names(state: dict[str, Tensor], bucket_bytes: int) -> list[list[str]]:
    """Names grouped in state order into buckets of at most `bucket_bytes` (a bigger tensor alone)."""
    buckets: list[list[str]] = []
    size = bucket_bytes
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += nbytes
    return buckets


def buffers_checksum(buffers: Iterable[Any]) -> str:
    """XXH3-64 (16 hex digits) over the bytes of `buffers` in order: the `shm` transport's checksum,
    over its bucket files whole (each safetensors header names every tensor's dtype, shape and
    offsets, and the data follows), one hash call per file instead of four per tensor."""
    import xxhash

    digest = xxhash.xxh3_64()
    for buffer in buffers:
        digest.update(buffer)
    return digest.hexdigest()


def verify(handle: WeightHandle, state: dict[str, Tensor], claimed_version: int, where: str) -> None:
    """Raise `WeightSyncError` unless `state` (read from `where`) is the handle's version and checksum."""
    if claimed_version != handle.version:
        raise WeightSyncError(
            f"{where} holds weight version {claimed_version}, but version {handle.version} was requested"
        )
    check_checksum(handle, state_checksum(state), len(state), where)


def check_checksum(handle: WeightHandle, got: str, num_tensors: int, where: str) -> None:
    """Raise `WeightSyncError` unless `got`, the checksum of what was read from `where`, is the handle's."""
    if got != handle.checksum:
        raise WeightSyncError(
            f"weight version {handle.version} from {where} fails its checksum: expected {handle.checksum}, "
            f"got {got} ({num_tensors} tensors; a bucket is corrupt or from another publish)"
        )


# Per-process files that can outlive a SIGKILLed driver are named `<prefix><owner pid>-<suffix>`, so
# `remove_orphans` can tell whose they are: the shm publisher's slots and the group's doorbell sockets.
SLOT_PREFIX = "assay-weights-"
BELL_PREFIX = "assay-bell-"

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_one_thread(dst: Tensor, src: Tensor) -> None:
    """`dst.copy_(src)` for CPU tensors of one shape, as a plain memcpy on the calling thread.

    A weight sync copies while the other side of it (the publisher, or a rollout actor) is awake on
    the same cores: torch's `copy_` of a few MiB wakes its OpenMP pool, whose threads then spin, and
    on a small machine the two pools take turns (a vLLM load several times slower: docs/benchmarks.md,
    "Measurements behind the code"). A copy is bound by memory bandwidth, which one thread already reaches; numpy copies without the pool
    (and releases the GIL). Elements are moved as same-size integers, so bf16 copies too; a `src` of
    another dtype (fp32 weights into a bf16 engine) is converted first, as `copy_` would."""
    if dst.shape != src.shape:
        raise ValueError(f"copy of shape {tuple(src.shape)} into shape {tuple(dst.shape)}")
    if dst.numel() == 0:
        return
    if src.dtype != dst.dtype:
        src = src.to(dst.dtype)
    as_int = _SAME_SIZE_INT[dst.element_size()]
    numpy.copyto(dst.detach().view(as_int).numpy(), src.detach().view(as_int).numpy())


def nbytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def remove_orphans(shm_dir: str = "/dev/shm") -> list[Path]:
    """Remove the shared-memory weight slots (in `shm_dir`) and doorbell socket directories (in the temp
    dir) whose owner process is dead: a driver killed with SIGKILL never reaches its clean-up, and two
    full weight copies stay in `/dev/shm`. The `assay` command calls it at every start, and a
    `RolloutGroup` for its own `rollout.shm_dir`; returns what it removed."""
    import tempfile

    removed = []
    for prefix, base in ((SLOT_PREFIX, Path(shm_dir)), (BELL_PREFIX, Path(tempfile.gettempdir()))):
        try:
            entries = [p for p in base.iterdir() if p.name.startswith(prefix)]
        except OSError:
            continue
        for path in entries:
            pid = path.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True

