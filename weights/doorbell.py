"""A same-node side channel for `shm` weight updates: the driver hands each rollout actor the
`WeightHandle` of a publish over a UNIX socket and reads the actor's metrics back, instead of making
a Ray actor call (`rollout.weight_notify=socket`, the default with `shm`).

Why: at the demo's size a weight update moves 4 MiB, and a Ray actor call costs about as much as an
in-process `load_state_dict` of it; a message of a few hundred bytes over a UNIX socket to a thread
the actor keeps waiting costs a hundredth of that (docs/benchmarks.md, "Measurements behind the
code"). The `shm` transport needs the driver and
every actor on one node anyway; `ray` and `nccl` keep their Ray calls.

Frames are a 4-byte big-endian length and a JSON object: the handle's fields one way, `{"ok":
metrics}` or `{"error": type name, "message": ...}` back, so an actor's `WeightSyncError` is raised
again in the driver as one. The actor's serving thread runs the same `update_weights` a Ray call
would, under the lock `RolloutActor` holds around generation, so a weight load never overlaps a
`generate` call.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from weights import WeightHandle, WeightSyncError, transport

_LENGTH = struct.Struct(">I")


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message).encode()
    conn.sendall(_LENGTH.pack(len(body)) + body)


def _receive(conn: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the other side closed the connection."""
    header = _read_exactly(conn, _LENGTH.size)
    if header is None:
        return None
    body = _read_exactly(conn, _LENGTH.unpack(header)[0])
    if body is None:
        return None
    return json.loads(body)


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = conn.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class DoorbellServer:
    """In the rollout actor: a daemon thread that serves one driver connection on `path`, calling
    `handler(handle)` for every handle it receives and sending back what it returns (or raised)."""

    def __init__(self, path: str, handler: Callable[[WeightHandle], dict[str, float]]) -> None:
        self.path = path
        self.handler = handler
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o600)  # only this user's processes may hand out weights
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, name="assay-weight-doorbell", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with conn:
                while (message := _receive(conn)) is not None:
                    try:
                        reply: dict[str, Any] = {"ok": self.handler(WeightHandle(**message))}
                    except Exception as exc:  # noqa: BLE001 -- the driver raises it; the actor keeps serving
                        reply = {"error": type(exc).__name__, "message": str(exc)}
                    _send(conn, reply)

    def close(self) -> None:
        self.listener.close()


class Doorbell:
    """In the driver: the connection to one actor's `DoorbellServer`."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.conn.connect(path)
        except OSError as exc:
            self.conn.close()
            raise RuntimeError(
                f"{name}: cannot reach its weight doorbell at {path} ({exc}); rollout.weight_sync=shm needs "
                "every rollout actor on the driver's node (use rollout.weight_sync=ray across nodes)"
            ) from exc

    def ring(self, handle: WeightHandle) -> None:
        """Hand `handle` to the actor; `answer` collects its reply (ring every actor first)."""
        if not transport(handle.transport).same_node:
            raise ValueError(f"the weight doorbell carries same-node handles (shm), not {handle.transport!r}")
        _send(self.conn, asdict(handle))

    def answer(self) -> dict[str, float]:
        """The actor's metrics for the handle last rung; its error raised again here."""
        reply = _receive(self.conn)
        if reply is None:
            raise RuntimeError(f"{self.name} closed its weight doorbell during a weight update (did it die?)")
        if "error" in reply:
            if reply["error"] == "WeightSyncError":
                raise WeightSyncError(reply["message"])
            raise RuntimeError(
                f"{self.name} failed to load the weights: {reply['error']}: {reply['message']}"
            )
        return reply["ok"]

    def close(self) -> None:
        self.conn.close()
