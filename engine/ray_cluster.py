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
# its C++ op (so the compile, about a minute, is paid once), vLLM in-process. The cache is `./.cache`, except in
# the fresh copy of the working directory a `ray job submit` job runs in (under Ray's
# `runtime_resources/`), where it would be compiled again for every job: there `~/.cache/assay`.
_IN_RAY_JOB_COPY = "runtime_resources" in Path.cwd().parts
_REPO_CACHE = Path(os.environ.get("ASSAY_CACHE_DIR") or (
    Path.home() / ".cache" / "assay" if _IN_RAY_JOB_COPY else Path.cwd() / ".cache"))
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
    """Join `address` (`auto` or `HOST:PORT`) or start a loopback-only local instance.

    Under the `assay` command (not `--verbose`) the workers' output and Ray's own log lines go to the
    stage's `third_party.log` (`engine.console`); the stage's run directory exists by now."""
    set_process_env()
    import ray

    from engine import console

    console.open_log()
    if ray.is_initialized():
        console.route_ray()
        return
    runtime_env = {"env_vars": worker_env()}
    # quiet: Ray leaves its loggers as console.route_loggers left them (propagating to the file)
    common: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True,
                              "configure_logging": not console.is_quiet()}
    if address:
        ray.init(address=address, **common)
    else:
        _init_local(ray, num_cpus, common)
    console.route_ray()
    from engine import stopping

    stopping.reinstall()  # ray.init replaced our SIGTERM handler with its own


def _init_local(ray: Any, num_cpus: int | None, common: dict[str, Any]) -> None:
    ray.init(
        address="local",  # always a new instance: never attach to someone else's Ray on this machine
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        **common,
    )
