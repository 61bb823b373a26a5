"""The `nccl` transport: learner rank 0 broadcasts every tensor to all rollout workers.

One process group joins the publisher (rank 0) and the N rollout workers (ranks 1..N). It is made
with vLLM's `stateless_init_torch_distributed_process_group`, so it leaves each process's default
torch.distributed group alone (the learner's DeepSpeed group, vLLM's own). On GPUs the group is
NCCL; on a CPU-only machine the same code runs over gloo, which is how it is tested here.

A publish sends a small header first (version, checksum, names/dtypes/shapes, as a pickled uint8
tensor), then each tensor in state order. Receivers allocate, receive and verify before loading.
The checksum is computed on the tensors' device (`device_checksum`): copying a large model to the
CPU for CRC-32 would cost more than the broadcast.

Ordering contract (`rendezvous`): the publisher and all readers enter `publish` / `load` for the same
version together: the driver starts every rollout actor's load (with `WeightHandle.expected`), then
the learner's publish, then waits for both.
"""

from __future__ import annotations

import pickle
import socket
import zlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from weights.base import WeightHandle, WeightSpec, WeightSyncError, nbytes

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements per checksum chunk: bounds the int64 temporary to 128 MiB
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64)}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def group_backend(device: torch.device) -> str:
    """`nccl` for CUDA tensors, `gloo` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_checksum(state: dict[str, Tensor]) -> str:
    """A checksum computed where the tensors are: per tensor, the sum of its bit patterns (as
    integers) weighted by position (1..65521, repeating), CRC-32-chained with name, dtype and shape
    in name order. Catches corruption and swapped or misnamed tensors; not a cryptographic hash."""
    crc = 0
    for name in sorted(state):
        tensor = state[name].detach().contiguous()
        bits = tensor.view(-1).view(_INT_OF_SIZE[tensor.element_size()])  # (numel,)
        total = 0
        for start in range(0, bits.numel(), _CHUNK):
            chunk = bits[start : start + _CHUNK].to(torch.int64)  # (C,)
            weights = torch.arange(start, start + chunk.numel(), device=chunk.device) % 65521 + 1  # (C,)
            total += int((chunk * weights).sum().item())
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{total}"
        crc = zlib.crc32(header.encode(), crc)
    return f"{crc:08x}"


def _join(host: str, port: int, rank: int, world_size: int, backend: str) -> Any:
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(host, port, rank, world_size, backend)


class NcclWeightSync:
    """The weight group of one run: rank 0 (learner rank 0) publishes, ranks 1..N (the rollout
    workers, on their engines' devices) load. `join` first, on every rank at once: it blocks until
    all `world_size` ranks have joined."""

    same_node: ClassVar[bool] = False
    rendezvous: ClassVar[bool] = True

    def __init__(self) -> None:
        self.group: Any = None
        self.rank = -1
        self.device = torch.device("cpu")

    @classmethod
    def from_spec(cls, spec: WeightSpec) -> NcclWeightSync:
        return cls()  # buckets do not apply: every tensor is its own broadcast

    def join(self, host: str, port: int, rank: int, world_size: int, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.rank = rank
        self.group = _join(host, port, rank, world_size, group_backend(self.device))

    def publish(self, state: dict[str, Tensor], version: int) -> WeightHandle:
        if self.rank != 0:
            raise WeightSyncError(f"rank {self.rank} of the nccl weight group loads weights; rank 0 publishes")
        tensors = {name: t.detach().to(self.device).contiguous() for name, t in state.items()}
        checksum = device_checksum(tensors)
        header = {
            "version": version,
            "checksum": checksum,
            "tensors": [(name, str(t.dtype), tuple(t.shape)) for name, t in tensors.items()],
        }
        _send_object(self.group, header, self.device)
        for tensor in tensors.values():
            self.group.broadcast(tensor, 0).wait()
        return WeightHandle("nccl", version, checksum, None, len(tensors), nbytes(tensors))

    def load(self, handle: WeightHandle) -> dict[str, Tensor]:
        """The state broadcast as `handle.version`, verified against the header's checksum (and the
        handle's, when the handle comes from the publish rather than `WeightHandle.expected`)."""
        if self.rank < 1:
            raise WeightSyncError("the nccl weight group's rank 0 publishes weights; ranks >= 1 load them")
        header = _receive_object(self.group, self.device)
        state: dict[str, Tensor] = {}
        for name, dtype, shape in header["tensors"]:
            tensor = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
            self.group.broadcast(tensor, 0).wait()
            state[name] = tensor
        if header["version"] != handle.version:
            raise WeightSyncError(
                f"the nccl broadcast carried weight version {header['version']}, but version "
                f"{handle.version} was requested"
            )
        got = device_checksum(state)
        for expected in {header["checksum"], handle.checksum} - {""}:
            if got != expected:
                raise WeightSyncError(
                    f"weight version {handle.version} from the nccl broadcast fails its checksum: "
                    f"expected {expected}, got {got}"
                )
        return state

    def recheck(self, handle: WeightHandle) -> None:
        """The received tensors are this reader's own: nothing can change under them."""

    def close(self) -> None:
        self.group = None


def _send_object(group: Any, obj: object, device: torch.device) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    group.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=device), 0).wait()
    group.broadcast(data, 0).wait()


def _receive_object(group: Any, device: torch.device) -> Any:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    group.broadcast(size, 0).wait()
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    group.broadcast(data, 0).wait()
    return pickle.loads(data.cpu().numpy().tobytes())
