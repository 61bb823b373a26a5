"""`RolloutGroup`: N `RolloutActor`s behind one `generate` and one `update_weights`.

Tasks are split into N contiguous, near-equal slices (one per actor, generated concurrently) and the
responses come back in task order, `n` per task, so the caller can view rewards as (prompts, n).
Seeded sampling depends on (seed, task id, sample index), not on which actor served a task, so the
split does not change what is sampled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import ray
import torch
from torch import Tensor

from rollout.actor import RolloutActor
from rollout.broadcast import BroadcastPublisher, free_port
from rollout.config import RolloutConfig
from rollout.doorbell import Doorbell
from rollout.types import Response, Sampling
from rollout.weight_sync import BELL_PREFIX, WeightHandle, WeightSync, make_weight_sync, remove_orphans
from verifiers.base import Task


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, end) ranges covering range(count), sizes differing by at most one."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class RolloutGroup:
    """The rollout side of the loop: generation across actors, weight publication to all of them."""

    def __init__(
        self,
        cfg: RolloutConfig,
        model_dir: str,
        num_workers: int | None = None,
        actor_options: list[dict[str, Any]] | None = None,
    ) -> None:
        """`actor_options[i]` is passed to `RolloutActor.options(...)` for actor i besides `num_gpus`
        (placement-group scheduling strategy, resources, ...)."""
        self.cfg = cfg
        self.num_workers = num_workers or cfg.num_workers
        if actor_options is not None and len(actor_options) != self.num_workers:
            raise ValueError(
                f"RolloutGroup: actor_options has {len(actor_options)} entries, expected {self.num_workers}"
            )
        options = actor_options or [{} for _ in range(self.num_workers)]
        self.actors = [
            RolloutActor.options(num_gpus=cfg.gpus_per_worker, **options[rank]).remote(  # type: ignore[attr-defined]
                cfg, str(model_dir), rank
            )
            for rank in range(self.num_workers)
        ]
        self.startup_s = ray.get([actor.ready.remote() for actor in self.actors])
        self.version = 0
        self.sync: WeightSync | None = None
        self.publisher: BroadcastPublisher | None = None
        self.doorbells: list[Doorbell] = []
        self._doorbell_dir: str | None = None
        if cfg.weight_sync == "nccl":
            self.publisher = self._join_broadcast()
        else:
            remove_orphans(cfg.shm_dir)  # what SIGKILLed runs left in this run's shm_dir
            self.sync = make_weight_sync(cfg)
        if cfg.weight_sync == "shm" and cfg.weight_notify == "socket":
            self.doorbells = self._open_doorbells()

    def _open_doorbells(self) -> list[Doorbell]:
        """One UNIX socket per actor (`rollout.doorbell`), in a short-named directory of this node's
        temp dir (a socket path must stay under ~100 bytes), removed by `shutdown`."""
        self._doorbell_dir = tempfile.mkdtemp(prefix=f"{BELL_PREFIX}{os.getpid()}-")  # owner pid: see remove_orphans
        paths = ray.get(
            [
                actor.open_doorbell.remote(f"{self._doorbell_dir}/{rank}.sock")
                for rank, actor in enumerate(self.actors)
            ]
        )
        return [Doorbell(path, f"rollout actor {rank}") for rank, path in enumerate(paths)]

    def _ring_doorbells(self, handle: WeightHandle) -> list[dict[str, float]]:
        """Every actor's metrics for `handle`, handed over by the doorbells (all rung before any reply
        is read, so the actors load at once); every reply is read before the first error is raised,
        so no stale reply waits on a socket."""
        for bell in self.doorbells:
            bell.ring(handle)
        replies: list[dict[str, float]] = []
        errors: list[RuntimeError] = []
        for bell in self.doorbells:
            try:
                replies.append(bell.answer())
            except RuntimeError as exc:  # a WeightSyncError too
                errors.append(exc)
        if errors:
            raise errors[0]
        return replies

    def _join_broadcast(self) -> BroadcastPublisher:
        """Rendezvous of this process (rank 0, the publisher) with every actor (ranks 1..N)."""
        host = ray.util.get_node_ip_address()
        port = free_port(host)
        world = len(self.actors) + 1
        joins = [
            actor.join_broadcast.remote(host, port, rank + 1, world) for rank, actor in enumerate(self.actors)
        ]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        publisher = BroadcastPublisher(host, port, world, device)  # returns once every actor has joined
        ray.get(joins)
        return publisher

    def generate(self, tasks: list[Task], n: int, sampling: Sampling) -> list[Response]:
        """`n` responses per task, in task order (task i's responses at [i*n, (i+1)*n))."""
        slices = [
            (a, tasks[s:e]) for a, (s, e) in zip(self.actors, split_evenly(len(tasks), len(self.actors)))
        ]
        futures = [actor.generate.remote(part, n, sampling) for actor, part in slices if part]
        return [response for part in ray.get(futures) for response in part]

    def update_weights(self, state: dict[str, Tensor], version: int) -> dict[str, float]:
        """Publish `state` as `version` and have every actor load it; returns timing metrics."""
        if version <= self.version:
            raise ValueError(
                f"weight version must increase: serving {self.version}, asked to publish {version}"
            )
        start = time.perf_counter()
        if self.publisher is not None:  # nccl: receivers wait in the broadcast the publisher starts
            receives = [actor.receive_broadcast.remote(version) for actor in self.actors]
            handle: WeightHandle = self.publisher.publish(state, version)
            publish_s = time.perf_counter() - start
            per_actor = ray.get(receives)
        else:
            assert self.sync is not None
            handle = self.sync.publish(state, version)
            publish_s = time.perf_counter() - start
            if self.doorbells:
                per_actor = self._ring_doorbells(handle)
            else:
                per_actor = ray.get([actor.update_weights.remote(handle) for actor in self.actors])
        self.version = version
        return {
            "rollout/weight_version": float(version),
            "perf/weight_publish_s": publish_s,
            "perf/weight_sync_s": time.perf_counter() - start,
            "perf/weight_load_s": max(m["rollout/weight_load_s"] for m in per_actor),
            "perf/weight_bytes": float(handle.num_bytes),
        }

    def versions(self) -> list[int]:
        """The version each actor serves (all equal after `update_weights`)."""
        return ray.get([actor.version.remote() for actor in self.actors])

    def shutdown(self) -> None:
        """Kill the actors and remove published weights."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        for bell in self.doorbells:
            bell.close()
        self.doorbells = []
        if self._doorbell_dir is not None:
            shutil.rmtree(self._doorbell_dir, ignore_errors=True)
        if self.sync is not None:
            self.sync.close()
        if self.publisher is not None:
            self.publisher.close()
