"""Weight transports from the learner to the rollout workers (DESIGN.md §5), behind one protocol.

`publish(state, version) -> WeightHandle` runs where the learner's full state dict is (the driver,
holding `LearnerGroup.state_dict_for_rollout()`); `load(handle) -> state` runs in each rollout
worker. A handle is small and picklable: it carries the version, a checksum of the whole state and
where the tensors are, so a Ray call (or, for `shm`, the `rollout.doorbell` socket) can hand it to
every actor.

- `shm`: safetensors bucket files in a per-run directory under `/dev/shm` (same node), in `keep`
  slots used in turn and rewritten in place (see `ShmWeightSync`); a slot's manifest names the
  version it holds, and a reader verifies version and checksum.
- `ray`: buckets in the Ray object store (any node); the publisher holds the refs of the newest
  `keep` versions so they outlive the call that hands them out.
- `nccl`: a broadcast from the publisher to every worker over one process group (NCCL on GPUs,
  gloo on CPUs); it needs a rendezvous, so it lives in `rollout.broadcast` and `RolloutGroup`.

Departure from DESIGN.md §5's `load(version)`: `load` takes the handle, because the `ray` transport
can only find its objects through the refs in it; the handle's version is what `load` verifies.

The checksum is XXH3-64: for `ray`, streamed over every tensor's name, dtype, shape and bytes (in
name order, `state_checksum`); for `shm`, over the slot's bucket files whole, in bucket order
(`buffers_checksum`: each file's safetensors header names every tensor's dtype, shape and offsets,
and its data follows). It catches a corrupted or mixed-up bucket, not a deliberate forgery. (On this
CPU XXH3 hashes 4 MiB in 0.07 ms against 1.4 ms for zlib's CRC-32, which ran twice per sync; one
call per file took 0.14 ms for the demo's state against 0.45 ms for four calls per tensor.)
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy
import torch
from torch import Tensor

from rollout.config import RolloutConfig

MANIFEST = "manifest.json"


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


class WeightSync(Protocol):
    """One transport: `publish` on the learner side, `load` in every rollout worker."""

    def publish(self, state: dict[str, Tensor], version: int) -> WeightHandle: ...

    def load(self, handle: WeightHandle) -> dict[str, Tensor]: ...

    def close(self) -> None:
        """Free what this publisher still holds (files, pinned objects)."""
        ...


def make_weight_sync(cfg: RolloutConfig) -> WeightSync:
    """The transport named by `cfg.weight_sync`."""
    bucket_bytes = cfg.bucket_mb * 2**20
    if cfg.weight_sync == "shm":
        return ShmWeightSync(cfg.shm_dir, bucket_bytes)
    if cfg.weight_sync == "ray":
        return RayWeightSync(bucket_bytes)
    raise ValueError(
        f"rollout.weight_sync={cfg.weight_sync!r} needs a rendezvous of the publisher and every worker: "
        "RolloutGroup sets it up (rollout.broadcast.BroadcastPublisher / BroadcastReceiver)"
    )


def load_published(handle: WeightHandle) -> dict[str, Tensor]:
    """Load (and verify) published weights with the transport that published them."""
    if handle.transport == "shm":
        return ShmWeightSync().load(handle)
    if handle.transport == "ray":
        return RayWeightSync().load(handle)
    raise WeightSyncError(f"weight version {handle.version}: unknown transport {handle.transport!r}")


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


@dataclass
class ShmWeightSync:
    """Safetensors buckets in `keep` slots `shm_dir/assay-weights-<run>/slot-<k>/` (same node only),
    used in turn: version after version overwrites the oldest slot.

    A slot whose files already have the state's layout (bucket by bucket the same names, dtypes and
    shapes: every publish of one run) is rewritten in place through a memory map the publisher keeps
    open -- no serialization, no new tmpfs pages, no directory churn; on the demo's model that took
    a publish from 5.5 ms to ~1 ms. A new layout writes fresh files. The slot's manifest (version,
    checksum of the files as written, bucket files) is removed first and written atomically last. A
    reader checks the manifest's version and the checksum of the files it mapped, and after its load
    that the manifest is still there (`recheck`), so a slot overwritten since its handle was made (the
    reader is `keep` versions behind) or a torn read is an error naming the version, never silently
    mixed weights.

    Serving a slot in place (`WeightHandle.shareable`, with `keep` >= 2): a vLLM actor may serve the
    mapped bytes themselves until its next load (`rollout.backends.WeightShares`). That is safe
    because `RolloutGroup.update_weights` publishes version v + 1 into another slot than v's and
    returns only once every actor has moved on to it, so the slot of v is rewritten (by v + 2) when
    nobody serves it any more; an actor whose load fails copies what it serves out of its slot first
    (`GenerationBackend.own_weights`).
    """

    shm_dir: str = "/dev/shm"
    bucket_bytes: int = 256 * 2**20
    keep: int = 2
    run: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _next_slot: int = field(default=0, repr=False)
    _layouts: dict[int, list[list[tuple[str, str, tuple[int, ...]]]]] = field(
        default_factory=dict, repr=False
    )
    _maps: dict[str, tuple[mmap.mmap, dict[str, numpy.ndarray]]] = field(default_factory=dict, repr=False)

    @property
    def root(self) -> Path:
        return Path(self.shm_dir) / f"{SLOT_PREFIX}{self.run}"

    def publish(self, state: dict[str, Tensor], version: int) -> WeightHandle:
        slot_index = self._next_slot
        self._next_slot = (slot_index + 1) % self.keep
        slot = self.root / f"slot-{slot_index}"
        buckets = bucket_names(state, self.bucket_bytes)
        files = [f"bucket-{i:04d}.safetensors" for i in range(len(buckets))]
        layout = [[(n, str(state[n].dtype), tuple(state[n].shape)) for n in names] for names in buckets]
        # The manifest goes first: a reader that re-reads it after its load (`recheck`) and finds it
        # gone or changed knows the slot was rewritten under its views.
        (slot / MANIFEST).unlink(missing_ok=True)
        if self._layouts.get(slot_index) == layout:
            for name, names in zip(files, buckets, strict=True):
                self._overwrite(slot / name, {n: state[n] for n in names})
        else:
            self._write_fresh(slot, files, buckets, state)
            self._layouts[slot_index] = layout
        checksum = buffers_checksum(self._map(slot / name)[0] for name in files)
        manifest = {"version": version, "checksum": checksum, "buckets": files}
        tmp = f"{slot}{os.sep}.{MANIFEST}.tmp-{uuid.uuid4().hex[:6]}"
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest))
        os.replace(tmp, f"{slot}{os.sep}{MANIFEST}")
        return WeightHandle(
            "shm", version, checksum, str(slot), len(state), _nbytes(state), shareable=self.keep >= 2
        )

    def load(self, handle: WeightHandle) -> dict[str, Tensor]:
        """The slot's tensors, verified, as read-only views of its mapped files: no copy is made (the
        backend copies them, or serves them in place) and the maps are kept for the next load. The
        tensors of one bucket file share one storage, in the file's order. The views read the
        slot as it is when read, so a caller that loads them calls `recheck` afterwards (see
        `RolloutActor.update_weights`)."""
        directory = Path(handle.location)
        manifest = _shm_manifest(handle)
        state: dict[str, Tensor] = {}
        files = []
        for name in manifest["buckets"]:
            try:
                mapped, views = mapped_bucket(directory / name)
            except Exception as exc:  # a damaged header: bad JSON, offsets past the file, a bad dtype
                raise WeightSyncError(
                    f"weight version {handle.version}: bucket {directory / name} is unreadable ({exc})"
                ) from exc
            files.append(mapped)
            state.update(views)
        check_checksum(handle, buffers_checksum(files), len(state), str(directory))
        return state

    def close(self) -> None:
        """Unmap and remove every slot this publisher wrote."""
        self._unmap()
        self._layouts = {}
        shutil.rmtree(self.root, ignore_errors=True)

    def _write_fresh(
        self, slot: Path, files: list[str], buckets: list[list[str]], state: dict[str, Tensor]
    ) -> None:
        self._unmap(str(slot))
        if slot.exists():
            shutil.rmtree(slot)  # a slot of another layout is replaced whole
        slot.mkdir(parents=True)
        for name, names in zip(files, buckets, strict=True):
            write_safetensors(slot / name, {n: state[n] for n in names})

    def _map(self, path: Path) -> tuple[mmap.mmap, dict[str, numpy.ndarray]]:
        """The writable map of the bucket file at `path` (kept until its slot is written afresh) and
        each tensor's bytes in it as a uint8 array (made once: ~10 us a tensor per publish)."""
        key = str(path)
        if key not in self._maps:
            with path.open("r+b") as f:
                mapped = mmap.mmap(f.fileno(), 0)
            base, header = _safetensors_header(mapped)
            spans = {
                n: numpy.frombuffer(
                    mapped,
                    numpy.uint8,
                    v["data_offsets"][1] - v["data_offsets"][0],
                    base + v["data_offsets"][0],
                )
                for n, v in header.items()
                if n != "__metadata__"
            }
            self._maps[key] = (mapped, spans)
        return self._maps[key]

    def _overwrite(self, path: Path, tensors: dict[str, Tensor]) -> None:
        """Copy `tensors` over the data of the same-layout safetensors file at `path` (a plain memcpy
        on this thread, as `copy_one_thread` does)."""
        _, spans = self._map(path)
        for name, tensor in tensors.items():
            target = spans[name]
            if target.size:
                numpy.copyto(
                    target, tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
                )

    def _unmap(self, under: str | None = None) -> None:
        for key in [k for k in self._maps if under is None or k.startswith(under + os.sep)]:
            mapped, spans = self._maps.pop(key)
            spans.clear()  # the arrays export the map's buffer
            try:
                mapped.close()
            except BufferError:  # a view still exported: the map goes when the view does
                pass


@dataclass
class RayWeightSync:
    """Buckets in the Ray object store; the publisher pins the newest `keep` versions."""

    bucket_bytes: int = 256 * 2**20
    keep: int = 2
    _live: list[list[Any]] = field(default_factory=list, repr=False)

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
        return WeightHandle("ray", version, checksum, refs, len(state), _nbytes(state))

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

    def close(self) -> None:
        self._live = []


def _shm_manifest(handle: WeightHandle) -> dict[str, Any]:
    """The manifest of the handle's slot, which must name the handle's version."""
    manifest_file = Path(handle.location) / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise WeightSyncError(
            f"weight version {handle.version}: {manifest_file} is missing (closed, being rewritten by a "
            "newer publish, or another node's /dev/shm?)"
        ) from None
    if int(manifest["version"]) != handle.version:
        raise WeightSyncError(
            f"{handle.location} holds weight version {manifest['version']}, but version {handle.version} was "
            "requested (its slot was reused: the reader is more versions behind than the publisher keeps)"
        )
    return manifest


def recheck(handle: WeightHandle) -> None:
    """After the tensors `load_published(handle)` returned were loaded: raise `WeightSyncError` if an `shm` slot
    changed under the views since they were verified (the publisher reused it while a reader was
    `keep` versions behind), so what was loaded is not the version the handle names. Ray objects are
    immutable: nothing to check.

    A publisher removes a slot's manifest before it touches the slot's data and writes the new one
    last, so the manifest still naming the handle's version after the load means no rewrite began
    since `load` verified the checksum: one small file read, not a second pass over the weights."""
    if handle.transport == "shm":
        try:
            _shm_manifest(handle)
        except WeightSyncError as exc:
            raise WeightSyncError(
                f"{exc}; re-read after the load: the slot was rewritten during the load, so the served "
                "weights are mixed"
            ) from exc


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


# The reader's maps of bucket files, kept across loads: path -> (inode, size, header bytes, views).
# The publisher rewrites a same-layout slot in place, so a kept map sees each new version with no new
# page faults (mapping a 4 MiB file afresh per load cost ~5 ms of faults here); a file written afresh
# (a new layout: new inode, new header) is mapped again.
_READ_MAPS: dict[str, tuple[int, int, bytes, mmap.mmap, dict[str, Tensor]]] = {}


_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file of `tensors` whose data keeps their order within each element size (wider
    first, so every tensor stays aligned and the buffer has no holes, as the format requires). The
    `safetensors` package sorts by name instead; keeping the state's order keeps a layer's q/k/v and
    gate/up projections adjacent, which lets a vLLM reader serve them as its fused weights in place."""
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())  # stable: the state's order within
    header: dict[str, Any] = {}
    arrays = []
    offset = 0
    for name in order:
        tensor = tensors[name].detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        arrays.append(tensor.view(-1).view(torch.uint8).numpy() if nbytes else b"")
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.writelines(arrays)  # type: ignore[arg-type]  # numpy arrays are buffers


def _safetensors_header(mapped: mmap.mmap) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of the safetensors file in `mapped`."""
    header_len = int.from_bytes(mapped[:8], "little")
    if not 0 < header_len <= len(mapped) - 8:
        raise ValueError(f"header length {header_len} does not fit a {len(mapped)}-byte file")
    return 8 + header_len, json.loads(bytes(mapped[8 : 8 + header_len]))


def mapped_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file at `path` as read-only views of a shared memory map (no
    copy; never write into them). The map is kept for the next call on the same file."""
    return mapped_bucket(path)[1]


def mapped_bucket(path: Path) -> tuple[mmap.mmap, dict[str, Tensor]]:
    """(the read-only map of the whole safetensors file at `path`, its tensors as views of it)."""
    info = os.stat(path)
    key = str(path)
    for stale in [k for k in _READ_MAPS if not os.path.exists(k)]:  # slots removed by their publisher
        del _READ_MAPS[stale]
    cached = _READ_MAPS.get(key)
    if cached is not None and cached[:2] == (info.st_ino, info.st_size):
        header_bytes, kept, kept_views = cached[2:]
        if kept[: len(header_bytes)] == header_bytes:  # the same layout, rewritten in place
            return kept, dict(kept_views)
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base, header = _safetensors_header(mapped)
    views: dict[str, Tensor] = {}
    with warnings.catch_warnings():  # a read-only buffer: torch warns that writes would fail
        warnings.simplefilter("ignore", UserWarning)
        # one storage for the file's data: views of adjacent tensors can be joined (VllmWeightExtension)
        size = len(mapped) - base
        data = (
            torch.frombuffer(mapped, dtype=torch.uint8, count=size, offset=base) if size else torch.empty(0)
        )
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if not 0 <= begin <= end <= len(mapped) - base:
            raise ValueError(f"tensor {name!r}: data offsets {begin}..{end} lie outside the file")
        if end == begin:
            views[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = data[begin:end]
        if begin % dtype.itemsize:  # unaligned (another writer's file): a private copy
            flat = flat.clone()
        views[name] = flat.view(dtype).view(shape)
    _READ_MAPS[key] = (info.st_ino, info.st_size, bytes(mapped[:base]), mapped, views)
    return mapped, dict(views)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_one_thread(dst: Tensor, src: Tensor) -> None:
    """`dst.copy_(src)` for CPU tensors of one shape, as a plain memcpy on the calling thread.

    A weight sync copies while the other side of it (the publisher, or a rollout actor) is awake on
    the same cores: torch's `copy_` of a few MiB wakes its OpenMP pool, whose threads then spin, and
    on this 2-core machine the two pools took turns -- a vLLM load went from 1 ms to 6-10 ms. A copy
    is bound by memory bandwidth, which one thread already reaches; numpy copies without the pool
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


def _nbytes(state: dict[str, Tensor]) -> int:
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

