"""Start or join Ray, bound to loopback by default.

A local instance needs three things to stay on 127.0.0.1 on this kind of machine:
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` set before `ray.init` (otherwise Ray advertises the machine's
other interface even when told 127.0.0.1), the dashboard off, and `RAY_AUTH_MODE=disabled`
(Ray 2.60 turns token auth on and then refuses explicit addresses).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Environment every Ray worker needs: DeepSpeed on the CPU accelerator, one shared JIT cache for
# its C++ op (so a run pays the ~70 s compile once), vLLM in-process.
_REPO_CACHE = Path(os.environ.get("ASSAY_CACHE_DIR", Path.cwd() / ".cache"))
WORKER_ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "TORCH_EXTENSIONS_DIR": str(_REPO_CACHE / "torch_extensions"),
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # nothing may reach for a model hub
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' per-load progress bars drown the run's own
}


def worker_env() -> dict[str, str]:
    """The environment variables passed to every actor (`runtime_env.env_vars`)."""
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV_DEFAULTS.items()}
    if "DS_ACCELERATOR" in os.environ or not _has_cuda():
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    return env


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def set_process_env() -> None:
    """Give this process the same defaults the actors get (call before importing transformers)."""
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (`auto` or `HOST:PORT`) or start a loopback-only local instance."""
    set_process_env()
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        _init_local(ray, num_cpus, runtime_env)
    from engine import stopping

    stopping.reinstall()  # ray.init replaced our SIGTERM handler with its own


def _init_local(ray: Any, num_cpus: int | None, runtime_env: dict[str, Any]) -> None:
    ray.init(
        address="local",  # always a new instance: never attach to someone else's Ray on this machine
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
    )
