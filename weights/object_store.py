"""The `ray` transport: buckets in the Ray object store (any node); the publisher pins the newest
`keep` versions so they outlive the call that hands out their refs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from weights.base import (
    WeightHandle,
    WeightSpec,
    WeightSyncError,
    bucket_names,
    nbytes,
    state_checksum,
    verify,
)


@dataclass
class RayWeightSync:
    """Buckets in the Ray object store; the publisher pins the newest `keep` versions."""

    same_node: ClassVar[bool] = False
    rendezvous: ClassVar[bool] = False

    bucket_bytes: int = 256 * 2**20
    keep: int = 2
    _live: list[list[Any]] = field(default_factory=list, repr=False)

    @classmethod
    def from_spec(cls, spec: WeightSpec) -> RayWeightSync:
        return cls(spec.bucket_bytes, spec.keep)

    def publish(self, state: dict[str, Tensor], version: int) -> WeightHandle:
        import ray

        checksum = state_checksum(state)
        refs = [
            ray.put(
                {"version": version, "tensors": {n: state[n].detach().to("cpu").contiguous() for n in names}}
            )
            for names in bucket_names(state, self.bucket_bytes)
        ]
        self._live = (self._live + [refs])[-self.keep :]
        return WeightHandle("ray", version, checksum, refs, len(state), nbytes(state))

    def load(self, handle: WeightHandle) -> dict[str, Tensor]:
        import ray

        state: dict[str, Tensor] = {}
        claimed = set()
        for bucket in ray.get(list(handle.location)):
            claimed.add(int(bucket["version"]))
            state.update(bucket["tensors"])
        if len(claimed) > 1:
            raise WeightSyncError(
                f"weight version {handle.version}: buckets from versions {sorted(claimed)} mixed"
            )
        verify(handle, state, claimed.pop() if claimed else handle.version, "the Ray object store")
        return state

    def recheck(self, handle: WeightHandle) -> None:
        """Ray objects are immutable: what was loaded is what was verified."""

    def close(self) -> None:
        self._live = []
