"""`VerifierPool`: score responses on process workers with a hard per-item timeout.

Why processes: verifiers run untrusted model output through sympy and the unit-test sandbox, both
of which can hang, blow up memory or crash the interpreter. A worker that does so is killed (with
its whole process group, so sandbox children go too) and replaced; the other items of the batch
are unaffected. Workers start from the `forkserver` context, never `fork`: the callers (the engine
driver, the gRPC server) have threads. There is no `signal.alarm`: the timeout is enforced from the
parent, which waits on the workers' pipes and sentinels with `multiprocessing.connection.wait`.

Scheduling is dynamic: one dispatcher thread hands the next queued item to whichever worker frees
up first, so one slow item does not hold back a fixed chunk. Several threads may call `score` at
once (the gRPC server does); their items share the queue in arrival order.

The timeout covers one `verify` call. Building a verifier (imports, sympy warm-up) happens once per
worker and has its own, longer budget (`build_timeout_s`), so a cold worker on a loaded machine does
not time out its first item.

Each item is run exactly once: an item whose worker crashed is not retried, so a response that
kills the verifier cannot take down a second worker.

Failures of the verifier are never a score (DESIGN.md §3, the Verdict contract): a `verify` that
raises, a worker that crashes, times out or is lost, a verifier that cannot be built, and a score
that is not finite or lies outside the verifier's declared `score_range` (default [0, 1]) all give
`Verdict(None, ..., outcome="infra_error", error=<kind>)`, the kinds of `verifiers.base.INFRA_ERRORS`.
The engine leaves them out of the loss, counts them per step and stops a run when too many fail.

Output: a worker's file descriptors 1 and 2 are a pipe to the pool's process (so the children of a
sandbox are captured too), never the console. The dispatcher drains it and keeps, per item, the last
`OUTPUT_TAIL_BYTES` bytes written while the item ran (or since the worker's previous item: a build's
prints go with the first item): that tail is appended to the verdict's reason and, with `log_path`,
to that file. The rest is read and dropped, so a verifier that prints without end costs the pool
pipe reads, not memory, disk or a flooded console.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from verifiers import registry
from verifiers.base import DEFAULT_SCORE_RANGE, Task, Verdict, infra_error, judged_outcome

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

_CTX = mp.get_context("forkserver")
_LATENCY_WINDOW = 10_000  # latencies kept per verifier for the percentiles
_MAX_START_FAILURES = 3  # consecutive workers dying before they are ready: the pool is broken
OUTPUT_TAIL_BYTES = 4096  # of a worker's stdout+stderr per item, kept in the reason and the log
_READ_BYTES = 1 << 16  # one read of a worker's output pipe
_DRAIN_BYTES = 1 << 20  # read per wake-up of one worker's output pipe, so one chatty worker cannot starve the rest


def _worker_main(conn: Connection, out: Connection, options: dict[str, dict[str, Any]],
                 preload: tuple[str, ...]) -> None:
    """Worker process: build verifiers once (cached by name), then verify items until told to stop."""
    os.setpgrp()  # own process group: killing it also kills the sandbox's children
    os.dup2(out.fileno(), 1)  # stdout and stderr, ours and our children's, go to the pool's pipe
    os.dup2(out.fileno(), 2)
    out.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    threading.Thread(target=_die_with_parent, daemon=True).start()
    built: dict[str, Any] = {}

    def build(name: str) -> str | None:
        """Build `name` once; the error text when that fails (tried again with its next item)."""
        if name not in built:
            try:
                built[name] = registry.load(name, **options.get(name, {}))
            except Exception as exc:  # noqa: BLE001 -- reported per item as a `build` infra error
                return f"{type(exc).__name__}: {exc}"
        return None

    for name in preload:
        build(name)
    _flush_output()
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if msg is None:
            return
        job_id, response, task = msg
        problem = None
        if task.verifier not in built:  # building (imports) has its own time budget: tell the parent
            conn.send(("building", job_id))
            problem = build(task.verifier)
            conn.send(("built", job_id))
        if problem is None:
            verdict = _verify(built[task.verifier], response, task)
        else:
            verdict = infra_error("build", f"build: cannot build verifier {task.verifier!r}: {problem}")
        _flush_output()  # everything printed for this item is in the pipe before its verdict is sent
        try:
            conn.send((job_id, verdict))
        except (EOFError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 -- an unpicklable verdict
            conn.send((job_id, infra_error("error", f"error: cannot send the verdict: {type(exc).__name__}: {exc}")))


def _verify(verifier: Any, response: str, task: Task) -> Verdict:
    """One `verify` call as a checked verdict: any failure of the verifier is an infra error."""
    try:
        verdict = verifier.verify(response, task)
    except Exception as exc:  # noqa: BLE001 -- any verifier bug becomes a verdict, never a dead worker
        return infra_error("error", f"error: verify raised {type(exc).__name__}: {exc}")
    if not isinstance(verdict, Verdict):
        return infra_error("error", f"error: verify returned {type(verdict).__name__}, expected Verdict")
    return checked_verdict(verdict, getattr(verifier, "score_range", DEFAULT_SCORE_RANGE))


def checked_verdict(verdict: Verdict, score_range: Any) -> Verdict:
    """`verdict` with its outcome derived from `score_range`; an `invalid_score` infra error when the
    score is not a finite number inside that range (or the range itself is malformed)."""
    if verdict.score is None:
        return verdict
    try:
        lo, hi = (float(x) for x in score_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError
    except (TypeError, ValueError):
        return infra_error("invalid_score", f"invalid_score: score_range {score_range!r} is not (lo, hi) with lo < hi")
    score = verdict.score
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not lo <= score <= hi:  # NaN fails too
        said = f" (the verifier said: {verdict.reason})" if verdict.reason else ""
        return infra_error("invalid_score", f"invalid_score: {score!r} is not a number in score_range [{lo:g}, {hi:g}]"
                                            f"{said}")
    return replace(verdict, score=float(score), outcome=judged_outcome(float(score), (lo, hi)))


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced by the verifier
            pass


def _die_with_parent() -> None:
    """Kill this worker's process group when the pool's process dies (even mid-verification)."""
    parent = mp.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os.killpg(os.getpgrp(), signal.SIGKILL)


class _Batch:
    """The items of one `score` call; the caller waits on `done`."""

    def __init__(self, size: int) -> None:
        self.verdicts: list[Verdict | None] = [None] * size
        self.remaining = size
        self.done = threading.Event()
        self.error: str | None = None


@dataclass
class _Job:
    id: int
    response: str
    task: Task
    batch: _Batch
    slot: int


class _Output:
    """What a worker wrote since its last item finished: the byte count and the last OUTPUT_TAIL_BYTES."""

    def __init__(self) -> None:
        self.size = 0
        self.tail = bytearray()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.tail += chunk[-OUTPUT_TAIL_BYTES:]
        del self.tail[:-OUTPUT_TAIL_BYTES]

    def take(self) -> tuple[int, str]:
        """(bytes written, the kept tail as text), and start over."""
        size, text = self.size, self.tail.decode("utf-8", "replace")
        self.size, self.tail = 0, bytearray()
        return size, text


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    out: Connection  # read end of the pipe that is the worker's stdout and stderr
    output: _Output = field(default_factory=_Output)
    out_closed: bool = False  # the pipe reached EOF (the worker and its children are gone)
    ready: bool = False
    job: _Job | None = None
    started: float = 0.0  # when the current job was sent
    deadline: float = math.inf  # for the current job, or for becoming ready (building preloads)
    tasks_done: int = 0
    retiring: bool = False  # told to exit after max_tasks_per_worker; gets no more jobs


@dataclass
class _Stats:
    count: int = 0
    timeouts: int = 0
    errors: int = 0
    crashes: int = 0
    infra_errors: int = 0
    score_sum: float = 0.0
    scored: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))


class VerifierPool:
    """Process workers that score `(response_text, task)` items with the verifier `task.verifier`.

    `timeout_s` limits each `verify` call (past it: a `timeout` infra error, worker replaced);
    `options` maps a verifier name to its constructor options; `max_tasks_per_worker` > 0 replaces a
    worker after that many items; `build_timeout_s` limits building one verifier in one worker;
    `log_path` is the file (appended to) that receives the workers' captured output, item by item.
    """

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        options: dict[str, dict[str, Any]] | None = None,
        max_tasks_per_worker: int = 0,
        build_timeout_s: float = 120.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"VerifierPool: workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"VerifierPool: timeout_s must be > 0, got {timeout_s}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.max_tasks_per_worker = max_tasks_per_worker
        self.build_timeout_s = max(float(build_timeout_s), self.timeout_s)
        self._options = {name: dict(opts) for name, opts in (options or {}).items()}
        for name, opts in self._options.items():
            check_options(name, opts)  # a misspelt verifier or option name is a config error, raised now
        self._known: tuple[str, ...] = tuple(self._options)  # verifiers new workers build up front
        self._lock = threading.Lock()
        self._pending: deque[_Job] = deque()
        self._stats: dict[str, _Stats] = {}
        self._restarts = 0
        self._next_id = 0
        self._closing = False
        self._broken: str | None = None
        self._log_path = log_path
        self._log_fd: int | None = None  # opened at the first output there is to log
        self._wake_r, self._wake_w = os.pipe()
        self._pool: list[_Worker] = []
        _CTX.set_forkserver_preload(["verifiers.pool"])
        self._pool = [self._spawn() for _ in range(workers)]
        self._thread = threading.Thread(target=self._dispatch, name="verifier-pool", daemon=True)
        self._thread.start()

    # ---- public API ----------------------------------------------------------------------------

    def score(self, items: list[tuple[str, Task]]) -> list[Verdict]:
        """Verdicts for `(response_text, task)` items, in input order (blocks until all are done)."""
        if not items:
            return []
        for i, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Task)):
                raise TypeError(f"VerifierPool.score: item {i} must be (response_text, Task), got {item!r:.200}")
        for name in {task.verifier for _, task in items} - set(self._known):
            registry.resolve(name)  # unknown verifier: raise here, before any work
            with self._lock:
                self._known = (*self._known, name)
        batch = _Batch(len(items))
        with self._lock:
            if self._closing:
                raise RuntimeError("VerifierPool.score: the pool is closed")
            if self._broken:
                raise RuntimeError(f"VerifierPool.score: {self._broken}")
            for slot, (response, task) in enumerate(items):
                self._next_id += 1
                self._pending.append(_Job(self._next_id, str(response), task, batch, slot))
        os.write(self._wake_w, b"x")
        batch.done.wait()
        if batch.error:
            raise RuntimeError(f"VerifierPool.score: {batch.error}")
        return [v if v is not None else infra_error("lost", "lost: no verdict came back") for v in batch.verdicts]

    def metrics(self) -> dict[str, float]:
        """Cumulative counters since the pool started, and latency percentiles over recent items."""
        out: dict[str, float] = {"verifier/workers": float(self.workers)}
        with self._lock:
            out["verifier/worker_restarts"] = float(self._restarts)
            out["verifier/queued"] = float(len(self._pending))
            for name, s in self._stats.items():
                prefix = f"verifier/{name}/"
                lat = sorted(s.latencies)
                out[prefix + "count"] = float(s.count)
                out[prefix + "timeouts"] = float(s.timeouts)
                out[prefix + "errors"] = float(s.errors)
                out[prefix + "crashes"] = float(s.crashes)
                out[prefix + "infra_errors"] = float(s.infra_errors)
                out[prefix + "score_mean"] = s.score_sum / s.scored if s.scored else 0.0
                out[prefix + "latency_p50_s"] = _percentile(lat, 0.50)
                out[prefix + "latency_p99_s"] = _percentile(lat, 0.99)
        return out

    def close(self) -> None:
        """Stop the workers. Calls still waiting get a RuntimeError."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._fail_all("the pool was closed while this call waited")
        for w in self._pool:
            try:
                w.conn.send(None)
            except (OSError, EOFError):
                pass
        for w in self._pool:
            w.process.join(timeout=1.0)
            if w.process.is_alive():
                _kill(w.process)
            self._drain(w, _DRAIN_BYTES)
            self._log_output(f"worker {w.process.pid} stopped", *w.output.take())
            w.conn.close()
            w.out.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._log_fd is not None:
            os.close(self._log_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- dispatcher thread ---------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = _CTX.Pipe(duplex=True)
        out_r, out_w = _CTX.Pipe(duplex=False)
        process = _CTX.Process(target=_worker_main, args=(child_conn, out_w, self._options, self._known),
                               name="assay-verifier", daemon=True)
        process.start()
        child_conn.close()
        out_w.close()
        os.set_blocking(out_r.fileno(), False)
        ready_by = time.monotonic() + self.build_timeout_s * max(1, len(self._known))
        return _Worker(process, parent_conn, out_r, deadline=ready_by)

    def _dispatch(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never leave a caller waiting forever
            self._fail_all(f"dispatcher died: {type(exc).__name__}: {exc}")
            raise

    def _loop(self) -> None:
        start_failures = 0
        while True:
            with self._lock:
                if self._closing:
                    break
                self._assign()
            next_deadline = min(w.deadline for w in self._pool)
            timeout = max(0.0, next_deadline - time.monotonic()) if next_deadline < math.inf else None
            conns = {w.conn: w for w in self._pool}
            sentinels = {w.process.sentinel: w for w in self._pool}
            outs = {w.out: w for w in self._pool if not w.out_closed}
            ready = wait([self._wake_r, *conns, *sentinels, *outs], timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for obj in ready:
                if obj in outs:
                    self._drain(outs[obj], _DRAIN_BYTES)
            dead: list[_Worker] = []
            for obj in ready:
                if obj in conns and not self._receive(conns[obj]):
                    dead.append(conns[obj])
            for obj in ready:
                if isinstance(obj, int) and obj in sentinels and sentinels[obj] not in dead:
                    w = sentinels[obj]
                    if w.conn.poll():  # a last result sent just before it exited
                        self._receive(w)
                    dead.append(w)
            now = time.monotonic()
            for w in self._pool:
                if w not in dead and now >= w.deadline:  # a job past its limit, or stuck starting
                    _kill(w.process)
                    if w.job is not None:
                        w.process.join(timeout=1.0)  # dead, so all it wrote is in its output pipe
                        self._finish(w, infra_error("timeout", f"timeout: verify ran past timeout_s={self.timeout_s:g}"))
                    dead.append(w)
            for w in dead:
                start_failures = start_failures + 1 if not w.ready else 0
                if w.job is not None:
                    w.process.join(timeout=1.0)  # its pipe can close a moment before it is reaped
                    code = w.process.exitcode
                    self._finish(w, infra_error("crash", f"crash: the worker died (exit code {code})"))
                self._replace(w)
            if start_failures >= _MAX_START_FAILURES:
                self._fail_all(
                    f"{start_failures} verifier workers in a row failed to start (crashed, or building the "
                    f"verifiers {list(self._known)} took over build_timeout_s={self.build_timeout_s})"
                )
                start_failures = 0

    def _assign(self) -> None:
        """Send queued jobs to idle workers (caller holds the lock)."""
        for w in self._pool:
            if not self._pending:
                return
            if w.ready and w.job is None and not w.retiring:
                job = self._pending.popleft()
                try:
                    w.conn.send((job.id, job.response, job.task))
                except (OSError, EOFError):
                    self._pending.appendleft(job)  # the worker died; its sentinel will fire
                    continue
                w.job, w.started = job, time.monotonic()
                w.deadline = w.started + self.timeout_s

    def _receive(self, w: _Worker) -> bool:
        """Read one message from a worker; False when its pipe is closed (the worker died)."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            return False
        if msg == ("ready",):
            w.ready, w.deadline = True, math.inf
            return True
        if msg[0] in ("building", "built"):  # the per-item timeout starts once the verifier is built
            if w.job is not None and w.job.id == msg[1]:
                budget = self.build_timeout_s if msg[0] == "building" else self.timeout_s
                w.deadline = time.monotonic() + budget
            return True
        job_id, verdict = msg
        if w.job is not None and w.job.id == job_id:
            self._finish(w, verdict)
            w.tasks_done += 1
            if self.max_tasks_per_worker and w.tasks_done >= self.max_tasks_per_worker:
                w.retiring = True
                try:
                    w.conn.send(None)
                except (OSError, EOFError):
                    pass
        return True

    def _finish(self, w: _Worker, verdict: Verdict) -> None:
        """Deliver a job's verdict, with the tail of the output its worker wrote meanwhile."""
        job = w.job
        assert job is not None
        w.job, w.deadline = None, math.inf
        name = registry.display_name(job.task.verifier)
        self._drain(w, _DRAIN_BYTES)  # the worker flushed before it sent the verdict: its output is in the pipe
        size, tail = w.output.take()
        if size:
            kept = f"last {OUTPUT_TAIL_BYTES} of {size} bytes" if size > OUTPUT_TAIL_BYTES else f"{size} bytes"
            verdict = replace(verdict, reason=f"{verdict.reason}\n[verifier output, {kept}]\n{tail}")
            self._log_output(f"{name} task {job.task.id}: {verdict.outcome} {verdict.error}".rstrip() + f", {kept}",
                             size, tail)
        with self._lock:
            s = self._stats.setdefault(name, _Stats())
            s.count += 1
            s.latencies.append(time.monotonic() - w.started)
            s.timeouts += verdict.error == "timeout"
            s.errors += verdict.error in ("error", "build", "crash", "lost")
            s.crashes += verdict.error == "crash"
            s.infra_errors += verdict.outcome == "infra_error"
            if verdict.score is not None:
                s.score_sum += verdict.score
                s.scored += 1
        batch = job.batch
        batch.verdicts[job.slot] = verdict
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.done.set()

    def _drain(self, w: _Worker, limit: float) -> None:
        """Read up to `limit` bytes of `w`'s output pipe without blocking (into `w.output`)."""
        read = 0
        while not w.out_closed and read < limit:
            try:
                chunk = os.read(w.out.fileno(), _READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                w.out_closed = True
                return
            w.output.add(chunk)
            read += len(chunk)

    def _log_output(self, header: str, size: int, tail: str) -> None:
        """Append one block of captured output to `log_path` (dispatcher thread only), in one write so
        that pools sharing the file (several verifier actors) do not interleave within a block."""
        if self._log_path is None or not size:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        block = f"--- {stamp} {header} ---\n{tail}" + ("" if tail.endswith("\n") else "\n")
        try:
            if self._log_fd is None:
                self._log_fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self._log_fd, block.encode("utf-8", "replace"))
        except OSError:  # e.g. the run directory is on another node: the tails stay in the reasons
            self._log_path = None

    def _replace(self, w: _Worker) -> None:
        _kill(w.process)
        w.process.join(timeout=5.0)
        self._drain(w, _DRAIN_BYTES)
        self._log_output(f"worker {w.process.pid} exited (exit code {w.process.exitcode})", *w.output.take())
        w.conn.close()
        w.out.close()
        i = self._pool.index(w)
        self._pool[i] = self._spawn()
        with self._lock:
            self._restarts += 1

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._broken = reason
            batches = {id(j.batch): j.batch for j in self._pending}
            batches.update({id(w.job.batch): w.job.batch for w in self._pool if w.job is not None})
            self._pending.clear()
        for batch in batches.values():
            batch.error = reason
            batch.done.set()


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise before any work when `name` is not a verifier (UnknownVerifierError) or its constructor
    does not take `options` (ValueError naming the options it does take)."""
    cls = registry.resolve(name)
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a builtin or extension type: nothing to check
        return
    try:
        signature.bind(**options)
    except TypeError as exc:
        takes = [p.name for p in signature.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        raise ValueError(f"verifier {name!r} does not take the options {sorted(options)}: {exc} "
                         f"(its options: {', '.join(takes) or 'none'})") from None


def _kill(process: BaseProcess) -> None:
    """SIGKILL the worker's process group (the worker and anything it started), else the worker."""
    if process.pid is None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            process.kill()
        except (ProcessLookupError, AttributeError):
            pass


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (0.0 for no values)."""
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
