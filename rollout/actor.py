"""`RolloutActor`: one rollout worker as a Ray actor, a thin shell around `RolloutWorker`.

All logic lives in `rollout.worker` (tests run it without Ray); this file forwards calls and fetches
published weights through the transport named in the handle. An in-process vLLM engine rebinds
threads and memory and opens a gloo group, which is why every engine gets an actor (a process) of
its own.
"""

from __future__ import annotations

import threading
import time

import ray

from rollout.config import RolloutConfig
from rollout.types import Response, Sampling
from verifiers.base import Task
from weights import WeightHandle, WeightSyncError, load_published, recheck, transport
from weights.doorbell import DoorbellServer


@ray.remote(num_cpus=1)
class RolloutActor:
    """Rank `rank` of a `RolloutGroup`."""

    def __init__(self, cfg: RolloutConfig, model_dir: str, rank: int = 0) -> None:
        import torch

        from rollout.worker import RolloutWorker  # the driver never imports transformers/vLLM for this

        torch.set_num_threads(cfg.threads)  # before the backend starts: vLLM's CPU worker pins them
        self.rank = rank
        self.worker = RolloutWorker(cfg, model_dir)
        self.lock = threading.Lock()  # a weight load through the doorbell thread never overlaps generation
        self.doorbell: DoorbellServer | None = None

    def ready(self) -> float:
        """Returns, once the backend is up, the seconds its start-up took."""
        return self.worker.startup_s

    def node_id(self) -> str:
        """The Ray node this actor runs on (`engine.placement` records it)."""
        return ray.get_runtime_context().get_node_id()

    def generate(self, tasks: list[Task], n: int, sampling: Sampling) -> list[Response]:
        with self.lock:
            return self.worker.generate(tasks, n, sampling)

    def open_doorbell(self, path: str) -> str:
        """Serve `update_weights` for handles sent to the UNIX socket `path` (`weights.doorbell`);
        returns the path once it listens."""
        if self.doorbell is not None:
            self.doorbell.close()
        self.doorbell = DoorbellServer(path, self.update_weights)
        return path

    def update_weights(self, handle: WeightHandle) -> dict[str, float]:
        """Fetch the published weights (version and checksum verified), load them in place. For a
        `rendezvous` transport, wait in the publisher's broadcast for `handle.version`."""
        if transport(handle.transport).rendezvous:
            with self.lock:
                return {"rollout/weight_load_s": self.worker.receive_broadcast(handle.version)}
        with self.lock:
            start = time.perf_counter()
            try:
                state = load_published(handle)
                fetch_s = time.perf_counter() - start
                load_s = self.worker.load_weights(state, handle.version, share=handle.shareable)
                try:
                    recheck(handle)  # shm: the views were not rewritten while they loaded
                except WeightSyncError:
                    self.worker.version = -1  # serving no published version
                    raise
            except Exception:
                # weights served from a slot (shared by an earlier load) become private copies: the
                # publisher reuses that slot two publishes on, and this actor will not have moved on
                self.worker.backend.own_weights()
                raise
        fast = float(getattr(self.worker.backend, "fast_load", False))
        return {
            "rollout/weight_fetch_s": fetch_s,
            "rollout/weight_load_s": load_s,
            "rollout/weight_load_fast": fast,
        }

    def version(self) -> int:
        return self.worker.version

    def backend_info(self) -> dict[str, str]:
        """The backend's name, its CPU linear kernel and the path its last weight load took (vllm)."""
        backend = self.worker.backend
        return {
            "backend": self.worker.cfg.backend,
            "cpu_linear": str(getattr(backend, "cpu_linear", "")),
            "load_path": str(getattr(getattr(backend, "load_path", ""), "value", "")),
        }

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.worker.join_broadcast(host, port, rank, world_size)
