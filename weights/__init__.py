"""Weights from learner rank 0 to the rollout workers (DESIGN.md §5): one protocol, a table of transports.

    learner rank 0: publisher.publish(state, version) -> WeightHandle   (small, picklable)
    driver:         hands the handle to every rollout actor (a Ray call, or the `shm` doorbell socket)
    rollout worker: reader.load(handle) -> state, version and checksum verified

`TRANSPORTS` maps `rollout.weight_sync` to a `WeightSync` class; its class attributes say what the
transport needs (`same_node`, `rendezvous`), so no caller branches on a transport's name:

| name   | where the bytes go                                    | same_node | rendezvous |
|--------|-------------------------------------------------------|-----------|------------|
| `shm`  | safetensors buckets in `/dev/shm` slots (`weights.shm`) | yes     | no         |
| `ray`  | buckets in the Ray object store (`weights.object_store`) | no     | no         |
| `nccl` | one broadcast per tensor over a process group (`weights.nccl`) | no | yes      |

This package imports neither Ray (lazily, inside the `ray` transport) nor vLLM nor DeepSpeed, so both
`learner/` and `rollout/` import it.
"""

from __future__ import annotations

from torch import Tensor

from weights.base import (
    BELL_PREFIX,
    SLOT_PREFIX,
    WeightHandle,
    WeightSpec,
    WeightSync,
    WeightSyncError,
    remove_orphans,
)
from weights.nccl import NcclWeightSync
from weights.object_store import RayWeightSync
from weights.shm import ShmWeightSync

TRANSPORTS: dict[str, type[ShmWeightSync | RayWeightSync | NcclWeightSync]] = {
    "shm": ShmWeightSync,
    "ray": RayWeightSync,
    "nccl": NcclWeightSync,
}

__all__ = [
    "BELL_PREFIX",
    "SLOT_PREFIX",
    "TRANSPORTS",
    "NcclWeightSync",
    "RayWeightSync",
    "ShmWeightSync",
    "WeightHandle",
    "WeightSpec",
    "WeightSync",
    "WeightSyncError",
    "load_published",
    "make_publisher",
    "reader",
    "recheck",
    "remove_orphans",
    "transport",
]


def transport(name: str) -> type[ShmWeightSync | RayWeightSync | NcclWeightSync]:
    """The transport class `name` names (a clear error naming the choices otherwise)."""
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync={name!r} is not one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name]


def make_publisher(spec: WeightSpec) -> WeightSync:
    """The publishing side of `spec.transport` (a `rendezvous` one must `join` before publishing)."""
    if spec.transport == "shm":
        remove_orphans(spec.shm_dir)  # slots that SIGKILLed runs left in this shm_dir
    return transport(spec.transport).from_spec(spec)


_READERS: dict[str, WeightSync] = {}


def reader(name: str) -> WeightSync:
    """This process's reader for transport `name` (not a `rendezvous` one: its reader is the member
    of the weight group that joined)."""
    kind = transport(name)
    if kind.rendezvous:
        raise WeightSyncError(f"a {name} handle is loaded by the reader that joined its weight group")
    if name not in _READERS:
        _READERS[name] = kind.from_spec(WeightSpec(name))
    return _READERS[name]


def load_published(handle: WeightHandle) -> dict[str, Tensor]:
    """The weights `handle` names, version and checksum verified."""
    return reader(handle.transport).load(handle)


def recheck(handle: WeightHandle) -> None:
    """After loading what `load_published(handle)` returned: raise `WeightSyncError` if it changed
    under the load (see `WeightSync.recheck`)."""
    reader(handle.transport).recheck(handle)
