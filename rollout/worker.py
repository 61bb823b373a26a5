"""`RolloutWorker`: tasks in, `Response`s out, from one generation backend; constructible without Ray.

The worker owns the tokenizer, so prompts are tokenized once, the learner's way
(`rollout.prompts.encode_prompt`: chat messages through the tokenizer's chat template, text as is), and
both backends see the same ids. It also owns the weight version it serves: 0 for the weights in
`model_dir`, then whatever version `load_weights` verified.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping

from torch import Tensor

from rollout.backends import GenerationBackend, make_backend
from rollout.config import RolloutConfig
from rollout.prompts import encode_prompt
from rollout.types import Response, Sampling
from verifiers.base import Task


def task_seed(seed: int | None, task_id: str) -> int | None:
    """The seed of one task's samples: a stable mix of the call's seed and the task id (so a task
    draws the same samples whichever worker, or position in a batch, serves it)."""
    if seed is None:
        return None
    return (seed * 1_000_003 + zlib.crc32(task_id.encode())) % 2**31


def sampling_from_config(cfg: RolloutConfig, seed: int | None = None) -> Sampling:
    """The config's sampling defaults; `seed` overrides `cfg.seed` (e.g. mixed with the step)."""
    return Sampling(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        stop=list(cfg.stop),
        seed=cfg.seed if seed is None else seed,
    )


class RolloutWorker:
    """One backend plus the tokenizer and weight version around it."""

    def __init__(self, cfg: RolloutConfig, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        start = time.perf_counter()
        self.backend: GenerationBackend = make_backend(
            cfg.backend,
            self.model_dir,
            cfg.dtype,
            cfg.max_model_len,
            **_vllm_kwargs(cfg),
        )
        self.startup_s = time.perf_counter() - start
        self.version = 0

    def generate(self, tasks: list[Task], n: int, sampling: Sampling) -> list[Response]:
        """`n` responses per task, task by task (responses of task i at [i*n, (i+1)*n))."""
        prompts = [self._prompt_ids(task) for task in tasks]
        seeds = [task_seed(sampling.seed, task.id) for task in tasks]
        completions = self.backend.generate(prompts, n, sampling, seeds) if tasks else []
        return [
            Response(
                task_id=task.id,
                prompt_ids=list(ids),
                response_ids=c.token_ids,
                rollout_logprobs=c.logprobs,
                text=c.text,
                finish_reason=c.finish_reason,
                weight_version=self.version,
            )
            for task, ids, samples in zip(tasks, prompts, completions, strict=True)
            for c in samples
        ]

    def load_weights(self, state: Mapping[str, Tensor], version: int, share: bool = False) -> float:
        """Serve `state` (HF names; already verified by the weight transport) as `version`; returns
        the seconds the in-place load took. `share`: `state` stays valid until the next load, so the
        backend may serve its tensors themselves (`GenerationBackend.load_weights`)."""
        start = time.perf_counter()
        self.backend.load_weights(state.items(), share=share)
        self.version = version
        return time.perf_counter() - start

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the `nccl` transport's weight group (see `weights.nccl`)."""
        self.backend.join_broadcast(host, port, rank, world_size)

    def receive_broadcast(self, version: int) -> float:
        """Receive and serve the weights broadcast as `version`; returns the seconds it took."""
        start = time.perf_counter()
        self.backend.receive_broadcast(version)
        self.version = version
        return time.perf_counter() - start

    def _prompt_ids(self, task: Task) -> list[int]:
        ids = encode_prompt(self.tokenizer, task.prompt)
        if not ids or len(ids) >= self.cfg.max_model_len:
            raise ValueError(
                f"task {task.id!r}: the prompt is {len(ids)} tokens, which leaves no room for a response "
                f"within rollout.max_model_len={self.cfg.max_model_len}"
            )
        return ids


def _vllm_kwargs(cfg: RolloutConfig) -> dict[str, object]:
    if cfg.backend != "vllm":
        return {}
    return {
        "kv_cache_gib": cfg.kv_cache_gib,
        "enforce_eager": cfg.enforce_eager,
        "seed": cfg.seed,
        "max_num_seqs": cfg.max_num_seqs,
        "cpu_linear": cfg.cpu_linear,
    }
