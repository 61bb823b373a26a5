"""The `shm` transport: safetensors bucket files in `/dev/shm` slots, rewritten in place (same node).

See `ShmWeightSync` for the slot protocol and `mapped_bucket` for the reader's kept maps.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy
import torch
from torch import Tensor

from weights.base import (
    SLOT_PREFIX,
    WeightHandle,
    WeightSpec,
    WeightSyncError,
    bucket_names,
    buffers_checksum,
    check_checksum,
    nbytes,
)

MANIFEST = "manifest.json"


@dataclass
class ShmWeightSync:
    """Safetensors buckets in `keep` slots `shm_dir/assay-weights-<run>/slot-<k>/` (same node only),
    used in turn: version after version overwrites the oldest slot.

    A slot whose files already have the state's layout (bucket by bucket the same names, dtypes and
    shapes: every publish of one run) is rewritten in place through a memory map the publisher keeps
    open -- no serialization, no new tmpfs pages, no directory churn (about 5x faster at the demo's
    size; docs/benchmarks.md, "Measurements behind the code"). A new layout writes fresh files. The slot's manifest (version,
    checksum of the files as written, bucket files) is removed first and written atomically last. A
    reader checks the manifest's version and the checksum of the files it mapped, and after its load
    that the manifest is still there (`recheck`), so a slot overwritten since its handle was made (the
    reader is `keep` versions behind) or a torn read is an error naming the version, never silently
    mixed weights.

    Serving a slot in place (`WeightHandle.shareable`, with `keep` >= 2): a vLLM actor may serve the
    mapped bytes themselves until its next load (`rollout.vllm_weights.WeightShares`). That is safe
    because `RolloutGroup.update_weights` publishes version v + 1 into another slot than v's and
    returns only once every actor has moved on to it, so the slot of v is rewritten (by v + 2) when
    nobody serves it any more; an actor whose load fails copies what it serves out of its slot first
    (`GenerationBackend.own_weights`).
    """

    same_node: ClassVar[bool] = True
    rendezvous: ClassVar[bool] = False

    shm_dir: str = "/dev/shm"
    bucket_bytes: int = 256 * 2**20
    keep: int = 2
    run: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _next_slot: int = field(default=0, repr=False)
    _layouts: dict[int, list[list[tuple[str, str, tuple[int, ...]]]]] = field(
        default_factory=dict, repr=False
    )
    _maps: dict[str, tuple[mmap.mmap, dict[str, numpy.ndarray]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_spec(cls, spec: WeightSpec) -> ShmWeightSync:
        return cls(spec.shm_dir, spec.bucket_bytes, spec.keep)

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
            "shm", version, checksum, str(slot), len(state), nbytes(state), shareable=self.keep >= 2
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

    def recheck(self, handle: WeightHandle) -> None:
        """After the tensors `load_published(handle)` returned were loaded: raise `WeightSyncError` if an `shm` slot
        changed under the views since they were verified (the publisher reused it while a reader was
        `keep` versions behind), so what was loaded is not the version the handle names. Ray objects are
        immutable: nothing to check.

        A publisher removes a slot's manifest before it touches the slot's data and writes the new one
        last, so the manifest still naming the handle's version after the load means no rewrite began
        since `load` verified the checksum: one small file read, not a second pass over the weights."""
        try:
            _shm_manifest(handle)
        except WeightSyncError as exc:
            raise WeightSyncError(
                f"{exc}; re-read after the load: the slot was rewritten during the load, so the served "
                "weights are mixed"
            ) from exc

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
        each tensor's bytes in it as a uint8 array (made once, not per publish)."""
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


# The reader's maps of bucket files, kept across loads: path -> (inode, size, header bytes, views).
# The publisher rewrites a same-layout slot in place, so a kept map sees each new version with no new
# page faults (mapping a file afresh per load costs more in faults than the copy); a file written afresh
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
