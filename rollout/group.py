"""`RolloutGroup`: N `RolloutActor`s behind one `generate` and one `update_weights`.

Tasks are split into N contiguous, near-equal slices (one per actor, generated concurrently) and the
responses come back in task order, `n` per task, so the caller can view rewards as (prompts, n).
Seeded sampling depends on (seed, task id, sample index), not on which actor served a task, so the
split does not change what is sampled.

Weights are published elsewhere (learner rank 0, `weights.make_publisher`); the group hands the
`WeightHandle` to every actor -- over the doorbell sockets for a `same_node` transport, by Ray calls
otherwise -- and, for a `rendezvous` transport, starts the actors' loads before the publish.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from rollout.actor import RolloutActor
from rollout.config import RolloutConfig
from rollout.types import Response, Sampling
from verifiers.base import Task
from weights import BELL_PREFIX, WeightHandle, WeightSync, make_publisher, transport
from weights.doorbell import Doorbell
from weights.nccl import free_port


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
    """The rollout side of the loop: generation across actors, weight handles to all of them."""

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
        self.transport = transport(cfg.weight_sync)
        self.doorbells: list[Doorbell] = []
        self._doorbell_dir: str | None = None
        if self.transport.same_node and cfg.weight_notify == "socket":
            self.doorbells = self._open_doorbells()

    def _open_doorbells(self) -> list[Doorbell]:
        """One UNIX socket per actor (`weights.doorbell`), in a short-named directory of this node's
        temp dir (a socket path must stay under ~100 bytes), removed by `shutdown`."""
        self._doorbell_dir = tempfile.mkdtemp(prefix=f"{BELL_PREFIX}{os.getpid()}-")  # owner pid: see remove_orphans
        paths = ray.get(
            [
                actor.open_doorbell.remote(f"{self._doorbell_dir}/{rank}.sock")
                for rank, actor in enumerate(self.actors)
            ]
        )
        return [Doorbell(path, f"rollout actor {rank}") for rank, path in enumerate(paths)]

    def join_weight_group(self, host: str, port: int) -> list[Any]:
        """For a `rendezvous` transport: start every actor's join as rank 1..N of a weight group of
        N + 1 on `host:port` (rank 0, the publisher, joins at the same time); the refs to wait on."""
        world = len(self.actors) + 1
        return [actor.join_broadcast.remote(host, port, rank + 1, world) for rank, actor in enumerate(self.actors)]

    def update_weights(self, publish: Callable[[int], WeightHandle], version: int) -> dict[str, float]:
        """Have `publish(version)` (the learner's, or a publisher's in this process) publish the weights
        and every actor load them; returns timing metrics."""
        self._check_version(version)
        start = time.perf_counter()
        if self.transport.rendezvous:  # the readers wait in the broadcast the publisher starts
            loads = [actor.update_weights.remote(WeightHandle.expected(self.cfg.weight_sync, version))
                     for actor in self.actors]
            handle = publish(version)
            publish_s = time.perf_counter() - start
            per_actor = ray.get(loads)
        else:
            handle = publish(version)
            publish_s = time.perf_counter() - start
            per_actor = self._deliver(handle)
        return self._served(handle, publish_s, time.perf_counter() - start, per_actor)

    def load_weights(self, handle: WeightHandle, publish_s: float = 0.0) -> dict[str, float]:
        """Have every actor load weights already published as `handle` (not a `rendezvous` transport's:
        those use `update_weights`); `publish_s` is what the publish took, for the metrics."""
        if self.transport.rendezvous:
            raise ValueError(f"RolloutGroup.load_weights: a {handle.transport} publish needs the readers "
                             "waiting before it starts; use update_weights")
        self._check_version(handle.version)
        start = time.perf_counter()
        per_actor = self._deliver(handle)
        return self._served(handle, publish_s, publish_s + time.perf_counter() - start, per_actor)

    def _check_version(self, version: int) -> None:
        if version <= self.version:
            raise ValueError(
                f"weight version must increase: serving {self.version}, asked to publish {version}"
            )

    def _deliver(self, handle: WeightHandle) -> list[dict[str, float]]:
        """Every actor's metrics for loading `handle`: over the doorbells (all rung before any reply is
        read, so the actors load at once; every reply read before the first error is raised, so no
        stale reply waits on a socket), or by Ray calls."""
        if not self.doorbells:
            return ray.get([actor.update_weights.remote(handle) for actor in self.actors])
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

    def _served(self, handle: WeightHandle, publish_s: float, sync_s: float,
                per_actor: list[dict[str, float]]) -> dict[str, float]:
        self.version = handle.version
        return {
            "rollout/weight_version": float(handle.version),
            "perf/weight_publish_s": publish_s,
            "perf/weight_sync_s": sync_s,
            "perf/weight_load_s": max(m["rollout/weight_load_s"] for m in per_actor),
            "perf/weight_bytes": float(handle.num_bytes),
        }

    def generate(self, tasks: list[Task], n: int, sampling: Sampling) -> list[Response]:
        """`n` responses per task, in task order (task i's responses at [i*n, (i+1)*n))."""
        slices = [
            (a, tasks[s:e]) for a, (s, e) in zip(self.actors, split_evenly(len(tasks), len(self.actors)))
        ]
        futures = [actor.generate.remote(part, n, sampling) for actor, part in slices if part]
        return [response for part in ray.get(futures) for response in part]

    def versions(self) -> list[int]:
        """The version each actor serves (all equal after `update_weights`)."""
        return ray.get([actor.version.remote() for actor in self.actors])

    def shutdown(self) -> None:
        """Kill the actors and close the doorbells."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        for bell in self.doorbells:
            bell.close()
        self.doorbells = []
        if self._doorbell_dir is not None:
            shutil.rmtree(self._doorbell_dir, ignore_errors=True)


def local_publisher(group: RolloutGroup) -> WeightSync:
    """A publisher in this process for `group`'s transport, joined to its actors when the transport
    needs a rendezvous: what tests, benchmarks and driver-only tools publish with (an RL run's
    publisher is learner rank 0, `LearnerGroup.attach_weights`). The caller closes it."""
    publisher = make_publisher(group.cfg.weight_spec())
    if group.transport.rendezvous:
        host = ray.util.get_node_ip_address()
        port = free_port(host)
        joins = group.join_weight_group(host, port)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        publisher.join(host, port, 0, len(group.actors) + 1, device)  # type: ignore[attr-defined]
        ray.get(joins)
    return publisher
