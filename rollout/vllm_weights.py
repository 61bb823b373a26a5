"""How new weights get into a served vLLM model, and which way each load went (`LoadPath`).

Calling `model.load_weights` directly breaks on vLLM's CPU backend, whose linear layers drop their
weights after packing them for oneDNN. So, fastest first:

- `shared`: where an `shm` slot may be served in place (`WeightHandle.shareable`), the parameters
  become views of the slot's mapped bytes (`WeightShares`) -- no copy at all;
- `copy`: with `rollout.cpu_linear=torch` (the default at the demo's size) the layers keep their
  weights and compute with `F.linear`, and a load is one copy per tensor (`copy_plan`, verified
  against the model's own load when it is made);
- `in_place_cpu`: with `onednn` linears every load gives the layers weights again, loads them the
  model's own way and re-packs them (`load_in_place_cpu`);
- `reload_weights`: vLLM's layerwise reload, off the CPU or for a layout the others do not know.

The state the extension keeps between loads lives in one object (`ServedWeights`) under one
attribute of vLLM's worker, `assay_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from weights.base import copy_one_thread

# Qualified name of the class vLLM mixes into its worker (see `VllmWeightExtension`).
VLLM_EXTENSION = "rollout.vllm_weights.VllmWeightExtension"


class LoadPath(str, Enum):
    """The way a weight load reached vLLM's model, fastest first."""

    SHARED = "shared"
    """Some parameters now ARE views of the published tensors (`WeightShares`); the rest copied."""
    COPY = "copy"
    """One copy per tensor into the kept weights (`copy_plan`)."""
    IN_PLACE_CPU = "in_place_cpu"
    """The model's own `load_weights` into re-created CPU linear weights (`load_in_place_cpu`)."""
    RELOAD = "reload_weights"
    """vLLM's general layerwise reload (every layer rebuilt): off the CPU, or a layout the others
    do not know."""
    MIXED = "mixed"
    """Workers of one engine took different paths."""
    NONE = ""
    """No load yet."""

    @property
    def fast(self) -> bool:
        return self in (LoadPath.SHARED, LoadPath.COPY, LoadPath.IN_PLACE_CPU)


@dataclass
class ServedWeights:
    """What Assay keeps on vLLM's worker between loads, under its one attribute `assay_weights`."""

    torch_linear: bool = False
    """The CPU linear layers compute with `F.linear` on kept weights (`rollout.cpu_linear=torch`)."""
    plan: dict[str, Tensor] | None = None
    """The copy plan (`copy_plan`): each checkpoint tensor's view of the served parameters."""
    shares: WeightShares | None = None
    receiver: Any = None
    """The `nccl` weight group's reader (`weights.nccl.NcclWeightSync`), once joined."""


class VllmWeightExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the vLLM worker. Every method
    returns plain values (a `LoadPath`'s string), since `collective_rpc` may cross a process."""

    def _served(self) -> ServedWeights:
        served = getattr(self, "assay_weights", None)
        if served is None:
            served = self.assay_weights = ServedWeights()
        return served

    def assay_use_torch_linear(self, weights: list[tuple[str, Tensor]]) -> str:
        """Serve `weights` (the checkpoint's) with `F.linear` on kept weights, and plan later loads as
        direct copies (`copy_plan`); returns the path later loads take (`copy`, or `in_place_cpu` where
        no plan could be verified), or `reload_weights` where the CPU in-place path does not apply."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if cpu_in_place_plan(model) is None:
            return LoadPath.RELOAD.value
        served = self._served()
        load_in_place_cpu(model, weights, torch_linear=True)
        served.torch_linear = True
        served.plan = copy_plan(model, dict(weights))
        if served.plan is None:
            return LoadPath.IN_PLACE_CPU.value
        served.shares = WeightShares(model, served.plan)
        return LoadPath.COPY.value

    def assay_reload_weights(self, weights: list[tuple[str, Tensor]], share: bool = False) -> str:
        """Load checkpoint-format (HF-named) weights in place, as if read from the model directory, by
        the fastest `LoadPath` that applies (`shared` only where `share` says the tensors stay valid
        until the next load); returns the path's string."""
        served = self._served()
        if served.plan is not None and served.shares is not None and all(name in served.plan for name, _ in weights):
            shared = served.shares.adopt(dict(weights) if share else {})
            with torch.no_grad():
                for name, tensor in weights:
                    if name not in shared:
                        copy_one_thread(served.plan[name], tensor)
            return (LoadPath.SHARED if shared else LoadPath.COPY).value
        self.assay_own_weights()
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if cpu_in_place_plan(model) is not None:
            load_in_place_cpu(model, weights, torch_linear=served.torch_linear)
            return LoadPath.IN_PLACE_CPU.value
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)  # type: ignore[attr-defined]
        _retie_lm_head(model)
        return LoadPath.RELOAD.value

    def assay_own_weights(self) -> None:
        """Serve private copies of the parameters the last load shared."""
        shares = self._served().shares
        if shares is not None:
            shares.adopt({})

    def assay_join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the `nccl` weight group on this worker's device."""
        from weights.nccl import NcclWeightSync

        receiver = NcclWeightSync()
        receiver.join(host, port, rank, world_size, self.device)  # type: ignore[attr-defined]
        self._served().receiver = receiver

    def assay_receive_broadcast(self, version: int) -> str:
        """Receive, verify and load the weights broadcast as `version`; returns the path's string."""
        from weights.base import WeightHandle

        state = self._served().receiver.load(WeightHandle.expected("nccl", version))
        return self.assay_reload_weights(list(state.items()))


def _retie_lm_head(model: Any) -> None:
    """Point a tied `lm_head` at the freshly loaded input embedding again.

    A tied checkpoint has no `lm_head.weight`, so vLLM's layerwise reload finds nothing to load into
    the head and puts its OLD kernel tensors back ("ParallelLMHead: Failed to load weights"): the
    output projection would keep serving the previous version. Re-tying and re-running the head's
    post-load processing (the CPU backend re-dispatches its GEMM there) fixes that.
    """
    config = getattr(model, "config", None)
    lm_head = getattr(model, "lm_head", None)
    if not getattr(config, "tie_word_embeddings", False) or lm_head is None:
        return
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is None:
        raise NotImplementedError(
            f"{type(model).__name__} ties its word embeddings but has no model.embed_tokens: cannot re-tie "
            "lm_head after a weight reload"
        )
    if lm_head.weight is not embed.weight:
        lm_head.weight = embed.weight
    lm_head.quant_method.process_weights_after_loading(lm_head)


def cpu_in_place_plan(model: Any) -> list[Any] | None:
    """The linear layers whose packed CPU GEMM a weight update must rebuild, or None where the fast
    CPU load does not apply (not the CPU platform, a quantized or unknown layer, a model without
    `load_weights`): then vLLM's general layerwise reload runs instead."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not hasattr(model, "load_weights"):
        return None
    layers = []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, LinearBase):
            if type(method) is not UnquantizedLinearMethod or not hasattr(module, "cpu_linear"):
                return None
            layers.append(module)
        elif isinstance(module, VocabParallelEmbedding) and type(method) is not UnquantizedEmbeddingMethod:
            return None
    return layers


def load_in_place_cpu(model: Any, weights: Iterable[tuple[str, Tensor]], torch_linear: bool = False) -> None:
    """vLLM's CPU linear layers drop their weight after packing it for oneDNN (or the small-GEMM
    kernel), so the model's own `load_weights` has nowhere to copy into, and the general layerwise
    reload (which rebuilds every layer from the meta device) is about twice as slow as this
    (docs/benchmarks.md, "Measurements behind the code").
    Instead: give each linear layer a weight of its packed shape again, let the model's own
    `load_weights` map the checkpoint names (q/k/v into qkv_proj, gate/up into gate_up_proj, a tied
    lm_head skipped) and copy, then re-run each layer's post-load step, which packs the new values
    and drops the weight again. Embeddings and norms keep their weights and are copied in place; the
    output head is re-packed too (a tied head shares the embedding's tensor).

    `torch_linear`: the layers keep their weights and compute with `F.linear` from then on (vLLM's
    own `_cpu_skip_gemm_dispatch` switch; the head likewise), so nothing is packed and a later load of
    the same model only copies (`rollout.cpu_linear=torch`)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    layers = cpu_in_place_plan(model)
    if layers is None:
        raise RuntimeError(f"{type(model).__name__}: the fast CPU weight load does not apply to this model")
    packed = {id(module) for module in layers if module.weight.numel() == 0}
    restored = set()
    for name, module in model.named_modules():
        if id(module) in packed:
            _recreate_linear_weight(module)
            restored.add(f"{name}.weight")
    with torch.no_grad():
        loaded = set(model.load_weights(weights))
    missing = sorted(restored - loaded)
    if missing:  # VllmBackend.load_weights checks the names first; this is a last line
        raise RuntimeError(
            f"the weights did not reach {len(missing)} layer(s) of the served {type(model).__name__}, "
            f"e.g. {missing[:3]}: they now serve garbage; restart the rollout actor"
        )
    for module in layers:
        if torch_linear:
            module._cpu_skip_gemm_dispatch = True
        module.quant_method.process_weights_after_loading(module)
    for module in model.modules():
        if isinstance(module, ParallelLMHead):
            if torch_linear:
                module.cpu_linear = torch.nn.functional.linear  # type: ignore[assignment]  # vLLM's hook slot
            else:
                module.quant_method.process_weights_after_loading(module)


def copy_plan(model: Any, weights: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """For each checkpoint tensor, the view of the served parameter it is loaded into -- the whole
    parameter, or its slice of a fused one (`packed_modules_mapping`: q/k/v stacked along dim 0 in
    `qkv_proj`, gate/up in `gate_up_proj`; one rank, no tensor parallelism; an embedding's first rows
    when vLLM pads the vocabulary, the padding rows staying zero) -- so that a load is one
    `copy_` per tensor, as `load_state_dict` does, instead of the model's name-mapping `load_weights`.

    Call it right after `weights` were loaded the model's own way: every view must equal its tensor
    and the views must cover every parameter whole, else None (a layout this plan does not know).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
    member_of = {member: (fused, i) for fused, members in packed.items() for i, member in enumerate(members)}
    plan: dict[str, Tensor] = {}
    covered: dict[int, int] = {}  # id(parameter) -> elements the plan writes
    for name, tensor in weights.items():
        module, _, leaf = name.rpartition(".")
        parent, _, short = module.rpartition(".")
        if short in member_of:
            fused, index = member_of[short]
            siblings = [f"{parent}.{m}.{leaf}" if parent else f"{m}.{leaf}" for m in packed[fused]]
            target = f"{parent}.{fused}.{leaf}" if parent else f"{fused}.{leaf}"
            if target not in params or any(s not in weights for s in siblings):
                return None
            offset = sum(weights[s].shape[0] for s in siblings[:index])
            param = params[target]
            if offset + tensor.shape[0] > param.shape[0]:
                return None
            view = param.data.narrow(0, offset, tensor.shape[0])
            written = tensor.numel()
        elif name in params:
            param = params[name]
            rows = tensor.shape[0] if tensor.dim() else 0
            view = param.data.narrow(0, 0, rows) if tensor.dim() and param.shape[0] > rows else param.data
            if view.numel() < param.numel() and bool(param.data[rows:].any()):
                return None  # rows past the checkpoint's (a vocabulary padded to 64) must be vLLM's zero fill
            written = param.numel()
        else:
            return None
        if view.shape != tensor.shape or not torch.equal(view, tensor.to(view.dtype)):
            return None
        plan[name] = view
        covered[id(param)] = covered.get(id(param), 0) + written
    whole = all(covered.get(id(p), 0) >= p.numel() for p in params.values())
    return plan if whole else None


class WeightShares:
    """Serving published weights without copying them: a parameter of the served model becomes a
    view of the published tensors themselves when those lie back to back in one buffer, in the
    parameter's row order, with its dtype and exactly its size (`shm` bucket files keep the state's
    order, so a layer's q/k/v and gate/up land so: `write_safetensors`). A parameter whose tensors do
    not (a vocabulary vLLM padded, another dtype) keeps its own memory and the copy plan's copies.

    Only for tensors that stay valid until the next load (`WeightHandle.shareable`). A parameter
    shared before and not now (a copy-only load, `own_weights` after a failed load) gets its own
    memory again first, and its copy plan's views are re-pointed into it, so a copy never writes into
    a read-only map nor into memory no longer served.
    """

    def __init__(self, model: Any, plan: dict[str, Tensor]) -> None:
        self.plan = plan
        self.params = dict(model.named_parameters())  # a tied head once: it is the embedding's tensor
        by_storage = {p.data.untyped_storage().data_ptr(): name for name, p in self.params.items()}
        self.members: dict[str, list[tuple[str, int]]] = {}  # parameter -> (checkpoint name, first row)
        for name, view in plan.items():
            target = by_storage[view.untyped_storage().data_ptr()]
            param = self.params[target].data
            row_bytes = param.stride(0) * param.element_size() if param.dim() else 1
            first_row = (view.data_ptr() - param.data_ptr()) // row_bytes
            self.members.setdefault(target, []).append((name, first_row))
        for parts in self.members.values():
            parts.sort(key=lambda part: part[1])
        self.shared: set[str] = set()  # parameters that are views of published tensors now
        # parameter -> its last two joins: (ids of the tensors, the tensors, their view). A reader
        # hands out the same view objects for a slot at every load (`mapped_bucket`), so alternating
        # slots hit this instead of checking a join afresh, parameter by parameter, at every load.
        self.joins: dict[str, list[tuple[tuple[int, ...], list[Tensor | None], Tensor]]] = {}

    def adopt(self, weights: dict[str, Tensor]) -> set[str]:
        """Point every parameter that `weights` can back (see the class) at them; own the rest again.
        Returns the checkpoint names now served in place (the caller copies the others)."""
        views = {}
        for target, parts in self.members.items():
            tensors = [weights.get(name) for name, _ in parts]
            key = tuple(map(id, tensors))
            kept = self.joins.setdefault(target, [])
            view = next((v for k, _, v in kept if k == key), None)
            if view is None:
                view = self._joined(self.params[target].data, tensors)
                if view is not None:
                    kept[:] = [*kept[-1:], (key, tensors, view)]  # holding the tensors keeps their ids
            if view is not None:
                views[target] = view
        for target in self.shared - views.keys():
            self._own(target)
        for target, view in views.items():
            self.params[target].data = view
        self.shared = set(views)
        return {name for target in views for name, _ in self.members[target]}

    @staticmethod
    def _joined(param: Tensor, tensors: list[Tensor | None]) -> Tensor | None:
        """One view of `tensors` shaped as `param`, or None where they are not laid out as it is."""
        if not tensors or any(t is None for t in tensors):
            return None
        first = tensors[0]
        assert first is not None
        position = first.data_ptr()
        storage = first.untyped_storage().data_ptr()
        rows = 0
        for t in tensors:
            assert t is not None
            if (
                t.dtype != param.dtype
                or not t.is_contiguous()
                or t.data_ptr() != position
                or t.untyped_storage().data_ptr() != storage
                or t.shape[1:] != param.shape[1:]
            ):
                return None
            position += t.numel() * t.element_size()
            rows += t.shape[0] if t.dim() else 1
        if rows != (param.shape[0] if param.dim() else 1):
            return None  # padding rows past the checkpoint's
        return first.as_strided(param.shape, param.stride(), first.storage_offset())

    def _own(self, target: str) -> None:
        param = self.params[target]
        param.data = param.data.clone()
        for name, first_row in self.members[target]:
            old = self.plan[name]
            self.plan[name] = param.data.narrow(0, first_row, old.shape[0]) if old.dim() else param.data


def _recreate_linear_weight(layer: Any) -> None:
    """Register `layer.weight` again, empty, exactly as the layer's constructor did (shape, loader)."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

    method = layer.quant_method
    v2 = hasattr(layer, "weight_loader_v2") and type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
    method.create_weights(
        layer=layer,
        input_size_per_partition=getattr(layer, "input_size_per_partition", layer.input_size),
        output_partition_sizes=layer.output_partition_sizes,
        input_size=layer.input_size,
        output_size=layer.output_size,
        params_dtype=layer.params_dtype,
        weight_loader=layer.weight_loader_v2 if v2 else layer.weight_loader,
    )
