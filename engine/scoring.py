"""The verifier pool inside the engine: one or more Ray actors around `VerifierPool`.

Each `VerifierPoolActor` owns a `VerifierPool` of process workers (or, with `verifier.endpoint`
set, a `RemoteVerifierPool` client of a gRPC verifier service on other hosts) and is otherwise
thin. `score_on_actors` spreads a batch over several actors and returns verdicts in input order.

The actors reserve no Ray CPUs (`num_cpus=0`): their process workers are outside Ray's accounting,
and reserving `verifier.workers` CPUs would leave a 2-core machine unable to place a learner.
"""

from __future__ import annotations

from typing import Any

import ray

from verifiers import Task, Verdict
from verifiers.config import VerifierConfig
from verifiers.pool import VerifierPool


def build_pool(cfg: VerifierConfig) -> Any:
    """A local process pool, or a client of the gRPC service at `cfg.endpoint`; both score/metrics/close."""
    if cfg.endpoint:
        from verifiers.service import RemoteVerifierPool

        return RemoteVerifierPool(cfg.endpoint, cfg.timeout_s, cfg.call_timeout_s)
    return VerifierPool(cfg.workers, cfg.timeout_s, dict(cfg.options), cfg.max_tasks_per_worker, cfg.build_timeout_s)


@ray.remote(num_cpus=0)
class VerifierPoolActor:
    def __init__(self, cfg: VerifierConfig) -> None:
        self.pool = build_pool(cfg)

    def score(self, items: list[tuple[str, Task]]) -> list[Verdict]:
        return self.pool.score(items)

    def metrics(self) -> dict[str, float]:
        return self.pool.metrics()

    def close(self) -> None:
        self.pool.close()


def start_verifier_actors(cfg: VerifierConfig, count: int = 1) -> list[Any]:
    """`count` pool actors, each with its own `cfg.workers` process workers."""
    return [VerifierPoolActor.remote(cfg) for _ in range(count)]  # type: ignore[attr-defined]


def score_on_actors(actors: list[Any], items: list[tuple[str, Task]]) -> list[Verdict]:
    """Contiguous shards of `items`, one per actor, scored concurrently; verdicts in input order."""
    if not items:
        return []
    size = -(-len(items) // len(actors))  # ceil
    shards = [items[i:i + size] for i in range(0, len(items), size)]
    results = ray.get([actor.score.remote(shard) for actor, shard in zip(actors, shards)])
    return [verdict for shard in results for verdict in shard]
