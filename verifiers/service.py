"""The gRPC verifier service: a `VerifierPool` on another machine, behind one batched `Score` call.

Rollout nodes are often GPU boxes with few spare cores; the unit-test sandbox wants many cores.
`serve` puts a pool behind a port (`assay serve-verifiers`), and `RemoteVerifierPool` is the client
with the same `score / metrics / close` interface as `VerifierPool`, so the engine picks one by
config (`verifier.endpoint`).

Failure behaviour: every call has a deadline, and a server that is down or dies mid-call surfaces
as `VerifierServiceError` naming the endpoint (gRPC reports the closed connection at once; client
keepalive pings catch a silent peer). Scoring is not retried: the caller decides.

The stubs `verifier_pb2*.py` are generated from `verifier.proto` and committed (the usual practice,
and it keeps grpcio-tools out of the runtime dependencies); a test regenerates them and compares.
"""

from __future__ import annotations

import json
import math
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from verifiers import verifier_pb2 as pb
from verifiers import verifier_pb2_grpc as pb_grpc
from verifiers.base import Task, Verdict
from verifiers.registry import UnknownVerifierError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

_MAX_MESSAGE = 256 * 1024 * 1024  # a batch of long responses exceeds gRPC's 4 MiB default
_MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
]
_CLIENT_OPTIONS = [
    *_MESSAGE_OPTIONS,
    ("grpc.keepalive_time_ms", 10_000),  # ping a quiet connection every 10 s during a long call
    ("grpc.keepalive_timeout_ms", 5_000),
]
_SERVER_OPTIONS = [
    *_MESSAGE_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),  # accept the clients' pings
    ("grpc.http2.max_ping_strikes", 0),
]
_SHORT_CALL_S = 10.0  # deadline of Health and Metrics


class VerifierServiceError(RuntimeError):
    """A call to the verifier service failed (server down, died mid-call, deadline, bad request)."""


def task_to_json(task: Task) -> str:
    """The JSON form of a task that travels in `Item.task_json`."""
    return json.dumps(
        {"id": task.id, "prompt": task.prompt, "reference": task.reference, "verifier": task.verifier, "meta": task.meta}
    )


def task_from_json(text: str) -> Task:
    """Parse `Item.task_json`; ValueError names the field that is missing or has the wrong type."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"task_json is not JSON: {exc}") from exc
    problem = _task_problem(data)
    if problem:
        raise ValueError(f"task_json {problem}")
    meta = data.get("meta") or {}
    return Task(data["id"], data.get("prompt", ""), data["reference"], data["verifier"], meta)


def _task_problem(data: Any) -> str | None:
    """What is wrong with a decoded task object, or None."""
    if not isinstance(data, dict):
        return f"must be a JSON object, got {type(data).__name__}"
    for key in ("id", "verifier"):
        if not isinstance(data.get(key), str):
            return f"field {key!r} must be a string, got {data.get(key)!r:.80}"
    if "reference" not in data:
        return "has no 'reference' field"
    if not isinstance(data.get("meta") or {}, dict):
        return f"field 'meta' must be an object, got {type(data['meta']).__name__}"
    return None


def _verdict_to_pb(v: Verdict) -> pb.Verdict:
    msg = pb.Verdict(reason=v.reason, metrics={k: float(x) for k, x in v.metrics.items()}, outcome=v.outcome,
                     error=v.error)
    if v.score is not None:
        msg.score = float(v.score)
    return msg


def _verdict_from_pb(msg: pb.Verdict) -> Verdict:
    """The verdict; its outcome as the server's pool set it (derived here only from an older server)."""
    return Verdict(msg.score if msg.HasField("score") else None, msg.reason, dict(msg.metrics), msg.outcome,
                   msg.error)


class _Servicer(pb_grpc.VerifierServiceServicer):
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        items = []
        for i, item in enumerate(request.items):
            try:
                items.append((item.response, task_from_json(item.task_json)))
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"item {i}: {exc}")
        try:
            verdicts = self.pool.score(items)
        except UnknownVerifierError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.ScoreResponse(verdicts=[_verdict_to_pb(v) for v in verdicts])

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(status="ok", workers=self.pool.workers, timeout_s=self.pool.timeout_s)

    def Metrics(self, request: pb.MetricsRequest, context: grpc.ServicerContext) -> pb.MetricsResponse:
        return pb.MetricsResponse(metrics=self.pool.metrics())


class VerifierServer:
    """A started gRPC server; `port` is the bound port (useful with port 0)."""

    def __init__(self, server: grpc.Server, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self, grace_s: float | None = 5.0) -> None:
        """Refuse new calls, let running ones finish for `grace_s`, then cancel them."""
        self.server.stop(grace_s).wait()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops; True if it did within `timeout_s`."""
        return self.server.wait_for_termination(timeout_s)


def serve(host: str, port: int, pool: Any, *, max_concurrent_calls: int = 32) -> VerifierServer:
    """Start serving `pool` (a `VerifierPool`) on `host:port` (port 0 picks a free port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_concurrent_calls), options=_SERVER_OPTIONS)
    pb_grpc.add_VerifierServiceServicer_to_server(_Servicer(pool), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"verifier service: cannot bind {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"verifier service: cannot bind {address}")
    server.start()
    return VerifierServer(server, host, bound)


class RemoteVerifierPool:
    """Client of a verifier service, with `VerifierPool`'s interface.

    `timeout_s` is the per-item budget; a `score` call's deadline is `call_timeout_s`, or by default
    `timeout_s * len(items) + 30` (the worst case of a one-worker server).
    """

    def __init__(self, endpoint: str, timeout_s: float, call_timeout_s: float | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.call_timeout_s = call_timeout_s
        self._channel = grpc.insecure_channel(endpoint, options=_CLIENT_OPTIONS)
        self._stub = pb_grpc.VerifierServiceStub(self._channel)

    def score(self, items: list[tuple[str, Task]]) -> list[Verdict]:
        """Verdicts for `(response_text, task)` items, in input order."""
        if not items:
            return []
        request = pb.ScoreRequest(items=[pb.Item(response=r, task_json=task_to_json(t)) for r, t in items])
        deadline = self.call_timeout_s or self.timeout_s * len(items) + 30.0
        response = self._call("Score", self._stub.Score, request, deadline, f"{len(items)} items")
        if len(response.verdicts) != len(items):
            raise VerifierServiceError(
                f"verifier service at {self.endpoint}: Score returned {len(response.verdicts)} verdicts "
                f"for {len(items)} items"
            )
        return [_verdict_from_pb(v) for v in response.verdicts]

    def metrics(self) -> dict[str, float]:
        """The server pool's metrics (shared by every client of that server)."""
        response = self._call("Metrics", self._stub.Metrics, pb.MetricsRequest(), _SHORT_CALL_S)
        return dict(response.metrics)

    def health(self) -> dict[str, Any]:
        """`{"status": "ok", "workers": N, "timeout_s": S}` from the server."""
        r = self._call("Health", self._stub.Health, pb.HealthRequest(), _SHORT_CALL_S)
        return {"status": r.status, "workers": r.workers, "timeout_s": r.timeout_s}

    def close(self) -> None:
        """Close the channel (the server keeps running)."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, fn: Any, request: Any, deadline_s: float, what: str = "") -> Any:
        if not math.isfinite(deadline_s) or deadline_s <= 0:
            raise ValueError(f"RemoteVerifierPool: bad deadline {deadline_s}")
        try:
            return fn(request, timeout=deadline_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            call = f"{method}({what})" if what else method
            raise VerifierServiceError(
                f"verifier service at {self.endpoint}: {call} failed with "
                f"{code.name if code else 'error'}: {detail}"
            ) from None
