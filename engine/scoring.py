"""The verifier pool inside the engine: one or more Ray actors around `VerifierPool`.

Each `VerifierPoolActor` owns a `VerifierPool` of process workers (or, with `verifier.endpoint`
set, a `RemoteVerifierPool` client of a gRPC verifier service on other hosts) and is otherwise
thin. `score_on_actors` spreads a batch over several actors and returns verdicts in input order.

The actors reserve no Ray CPUs (`num_cpus=0`): their process workers are outside Ray's accounting,
and reserving `verifier.workers` CPUs would leave a 2-core machine unable to place a learner.

Verifier failures (DESIGN.md §3): a verdict whose outcome is `infra_error` has no score, so the loss
and the group statistics leave it out; `step_verifier_metrics` counts a step's infra errors per
verifier, warns on the console when there are any, and stops the run (`VerifierInfraError`) when
their share passes `verifier.max_infra_error_frac`. What the verifiers print goes to `log_path`.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from verifiers import Task, Verdict, registry
from verifiers.base import DEFAULT_SCORE_RANGE, infra_error
from verifiers.config import VerifierConfig
from verifiers.pool import VerifierPool, checked_verdict
from verifiers.registry import display_name

# `Verdict.error` -> the per-step counters `verifier/<name>/...` it adds one to besides `infra_errors`
# (a timed-out or crashed item also cost its worker, which the pool replaced).
ERROR_COUNTERS: dict[str, tuple[str, ...]] = {
    "timeout": ("timeouts", "restarts"),
    "crash": ("crashes", "restarts"),
    "lost": ("crashes",),
    "bad_reference": ("bad_references",),
}
STEP_COUNTERS = ("infra_errors", "timeouts", "crashes", "restarts", "bad_references")


class VerifierInfraError(RuntimeError):
    """Too many of one step's verifications failed in the verifier itself: the run stops."""


def build_pool(cfg: VerifierConfig, log_path: str | os.PathLike[str] | None = None) -> Any:
    """A local process pool, or a client of the gRPC service at `cfg.endpoint`; both score/metrics/close.
    `log_path` receives the local workers' captured output (a service logs its own: `--log`)."""
    if cfg.endpoint:
        from verifiers.service import RemoteVerifierPool

        return RemoteVerifierPool(cfg.endpoint, cfg.timeout_s, cfg.call_timeout_s)
    return VerifierPool(cfg.workers, cfg.timeout_s, dict(cfg.options), cfg.max_tasks_per_worker, cfg.build_timeout_s,
                        log_path=log_path)


class VerifierPoolActor:
    """A Ray actor (`start_verifier_actors` makes it one) holding one pool, and the batched verifiers
    (`batched = True` with a `verify_batch`, as `engine.reward_model`'s), which it builds once and runs in
    its own process on whole lists of items instead of sending them one by one to process workers."""

    def __init__(self, cfg: VerifierConfig, log_path: str | None = None) -> None:
        self.pool = build_pool(cfg, log_path)
        self.options = dict(cfg.options)
        self.batched: dict[str, Any] = {}  # name -> the built verifier, or None for a per-item one

    def score(self, items: list[tuple[str, Task]]) -> list[Verdict]:
        names = {task.verifier for _, task in items}
        own = {name for name in names if self._batched(name) is not None}  # built, or a build error to report
        if not own:
            return self.pool.score(items)
        verdicts: list[Verdict | None] = [None] * len(items)
        rest = [i for i, (_, task) in enumerate(items) if task.verifier not in own]
        for i, verdict in zip(rest, self.pool.score([items[i] for i in rest]) if rest else []):
            verdicts[i] = verdict
        for name in own:
            index = [i for i, (_, task) in enumerate(items) if task.verifier == name]
            for i, verdict in zip(index, self._score_batched(name, [items[i] for i in index])):
                verdicts[i] = verdict
        return [v for v in verdicts if v is not None]

    def _batched(self, name: str) -> Any:
        """The built batched verifier `name`, or None when it is a per-item one (the pool's)."""
        if name not in self.batched:
            try:
                cls = registry.resolve(name)
            except registry.UnknownVerifierError:
                self.batched[name] = None  # the pool reports it, per item
                return None
            if not is_batched(cls):
                self.batched[name] = None
                return None
            try:
                self.batched[name] = registry.load(name, **self.options.get(name, {}))
            except Exception as exc:  # noqa: BLE001 -- reported per item as a `build` infra error, built again next time
                return f"build: cannot build verifier {name!r}: {type(exc).__name__}: {exc}"
        return self.batched[name]

    def _score_batched(self, name: str, items: list[tuple[str, Task]]) -> list[Verdict]:
        verifier = self._batched(name)
        if isinstance(verifier, str):
            return [infra_error("build", verifier)] * len(items)
        try:
            verdicts = verifier.verify_batch(items)
        except Exception as exc:  # noqa: BLE001 -- a failing verifier is an infra error per item, never a crash
            return [infra_error("error", f"error: {name}.verify_batch raised {type(exc).__name__}: {exc}")] * len(items)
        if len(verdicts) != len(items):
            return [infra_error("error", f"error: {name}.verify_batch returned {len(verdicts)} verdicts for "
                                         f"{len(items)} items")] * len(items)
        score_range = getattr(verifier, "score_range", DEFAULT_SCORE_RANGE)
        return [checked_verdict(v, score_range) if isinstance(v, Verdict) else
                infra_error("error", f"error: {name}.verify_batch returned {type(v).__name__}") for v in verdicts]

    def metrics(self) -> dict[str, float]:
        return self.pool.metrics()

    def close(self) -> None:
        self.pool.close()


def is_batched(verifier: Any) -> bool:
    """Whether a verifier (class or object) scores lists of items itself: `batched = True` and a
    `verify_batch(items) -> list[Verdict]`."""
    return bool(getattr(verifier, "batched", False)) and callable(getattr(verifier, "verify_batch", None))


def start_verifier_actors(cfg: VerifierConfig, count: int = 1,
                          log_path: str | os.PathLike[str] | None = None) -> list[Any]:
    """`count` pool actors, each with its own `cfg.workers` process workers; all of them append what
    their verifiers print to `log_path` (the run directory's `verifier.log`), one block per item."""
    import ray  # here, not at the top: collectors import this module, and engine.config imports their table

    path = os.fspath(log_path) if log_path is not None else None
    actor = ray.remote(num_cpus=0)(VerifierPoolActor)
    return [actor.remote(cfg, path) for _ in range(count)]


def score_on_actors(actors: list[Any], items: list[tuple[str, Task]]) -> list[Verdict]:
    """Contiguous shards of `items`, one per actor, scored concurrently; verdicts in input order."""
    import ray

    if not items:
        return []
    size = -(-len(items) // len(actors))  # ceil
    shards = [items[i:i + size] for i in range(0, len(items), size)]
    results = ray.get([actor.score.remote(shard) for actor, shard in zip(actors, shards)])
    return [verdict for shard in results for verdict in shard]


def step_verifier_metrics(judged: list[tuple[Task, Verdict]], step: int, max_infra_error_frac: float) -> dict[str, float]:
    """One step's verifier counters from its `(task, verdict)` pairs: `verifier/<name>/{infra_errors,
    timeouts, crashes, restarts, bad_references}` for every verifier used and `verifier/infra_error_frac`
    over all.

    Prints one `[assay]` warning when the step had any infra error (they are left out of the loss, so
    without it a broken verifier only shows as a smaller batch), and raises VerifierInfraError, naming
    the verifier with the most and its most common reason, when their share is above
    `max_infra_error_frac`."""
    metrics: dict[str, float] = {}
    failed: dict[str, list[Verdict]] = {}
    for task, verdict in judged:
        prefix = f"verifier/{display_name(task.verifier)}/"
        for counter in STEP_COUNTERS:
            metrics.setdefault(prefix + counter, 0.0)
        if verdict.outcome == "infra_error":
            failed.setdefault(display_name(task.verifier), []).append(verdict)
            for counter in ("infra_errors", *ERROR_COUNTERS.get(verdict.error, ())):
                metrics[prefix + counter] += 1.0
    errors = sum(len(v) for v in failed.values())
    metrics["verifier/infra_error_frac"] = errors / len(judged) if judged else 0.0
    if not errors:
        return metrics
    name = max(failed, key=lambda k: len(failed[k]))
    (kind, reason), times = Counter((v.error, v.reason.split("\n", 1)[0][:200]) for v in failed[name]).most_common(1)[0]
    line = (f"step {step}: {errors} of {len(judged)} verifications were infra errors (scored None, left out of "
            f"the loss); verifier {name!r}: {len(failed[name])}, most often {kind} ({times}x): {reason}")
    if metrics["verifier/infra_error_frac"] > max_infra_error_frac:
        raise VerifierInfraError(f"{line}; that is above verifier.max_infra_error_frac={max_infra_error_frac}, "
                                 f"so the run stops (the verifiers' output is in the run's verifier.log)")
    print(f"[assay] warning: {line}; counted in verifier/<name>/infra_errors", flush=True)
    return metrics
