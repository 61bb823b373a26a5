"""verifiers.service: a real gRPC server on 127.0.0.1 in front of a real VerifierPool."""

from __future__ import annotations

import filecmp
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from tests.verifiers.plugins import PATH, start_server
from verifiers import verifier_pb2 as pb
from verifiers import verifier_pb2_grpc as pb_grpc
from verifiers.base import Task, Verdict, infra_error
from verifiers.pool import VerifierPool
from verifiers.service import RemoteVerifierPool, VerifierServiceError, serve, task_from_json, task_to_json

ECHO, SLEEPY, TEN_POINT = f"{PATH}:EchoVerifier", f"{PATH}:SleepyVerifier", f"{PATH}:TenPointVerifier"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server():
    with VerifierPool(workers=2, timeout_s=1.0) as pool:
        srv = serve("127.0.0.1", 0, pool)
        yield srv
        srv.stop(grace_s=0)


@pytest.fixture
def client(server):
    with RemoteVerifierPool(server.endpoint, timeout_s=1.0) as c:
        yield c


def test_remote_score_matches_the_local_verdicts(client: RemoteVerifierPool) -> None:
    items = [("a", Task("1", "p", "a", ECHO)), ("b", Task("2", "p", "a", ECHO)), ("x", Task("3", "p", None, ECHO)),
             ("hang", Task("4", "p", "", SLEEPY)), ("5", Task("5", "p", "", TEN_POINT))]
    assert client.score(items) == [
        Verdict(1.0, "echo", {"length": 1.0}), Verdict(0.0, "echo", {"length": 1.0}),
        Verdict(None, "no reference"),  # an unset `score` field comes back as None
        infra_error("timeout", "timeout: verify ran past timeout_s=1"),
        Verdict(5.0, "out of ten", outcome="fail"),  # the server's outcome (range 0-10) travels, not re-derived
    ]


def test_concurrent_clients_on_one_server(server) -> None:
    results: dict[int, list[Verdict]] = {}

    def run(k: int) -> None:
        with RemoteVerifierPool(server.endpoint, timeout_s=1.0) as c:
            results[k] = c.score([(str(i % 2), Task(f"{k}-{i}", "", "1", ECHO)) for i in range(25)])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    for verdicts in results.values():
        assert [v.score for v in verdicts] == [0.0, 1.0] * 12 + [0.0]


def test_health_and_metrics(client: RemoteVerifierPool) -> None:
    client.score([("a", Task("1", "", "a", ECHO))])
    assert client.health() == {"status": "ok", "workers": 2, "timeout_s": 1.0}
    m = client.metrics()
    assert m["verifier/EchoVerifier/count"] >= 1.0
    assert {"verifier/EchoVerifier/latency_p50_s", "verifier/EchoVerifier/latency_p99_s",
            "verifier/EchoVerifier/timeouts", "verifier/EchoVerifier/errors"} <= set(m)


def test_unknown_verifier_is_an_invalid_argument(client: RemoteVerifierPool) -> None:
    with pytest.raises(VerifierServiceError, match="INVALID_ARGUMENT.*unknown verifier 'nope'"):
        client.score([("a", Task("1", "", "a", "nope"))])


def test_bad_task_json_names_the_item(server) -> None:
    with grpc.insecure_channel(server.endpoint) as channel:
        stub = pb_grpc.VerifierServiceStub(channel)
        request = pb.ScoreRequest(items=[pb.Item(response="a", task_json=task_to_json(Task("1", "", "a", ECHO))),
                                         pb.Item(response="a", task_json='{"id": "2"}')])
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item 1" in err.value.details() and "'verifier'" in err.value.details()


def test_task_json_round_trip() -> None:
    t = Task("7", [{"role": "user", "content": "hi"}], {"test": "assert f()", "entry_point": "f"}, "unit_tests",
             {"source": "x"})
    assert task_from_json(task_to_json(t)) == t


def test_nothing_listening_errors_with_the_endpoint() -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        RemoteVerifierPool(f"127.0.0.1:{port}", timeout_s=1.0) as c,
        pytest.raises(VerifierServiceError, match=rf"127\.0\.0\.1:{port}.*UNAVAILABLE"),
    ):
        c.score([("a", Task("1", "", "a", ECHO))])


def test_server_killed_mid_call_errors_with_the_endpoint() -> None:
    proc, endpoint = start_server(workers=1, timeout_s=120.0)
    try:
        with RemoteVerifierPool(endpoint, timeout_s=120.0) as c:
            assert c.health()["status"] == "ok"  # the server is up and answering
            threading.Timer(1.0, proc.kill).start()
            # A 60 s item with a 600 s deadline: only the dropped connection can end this call,
            # so UNAVAILABLE (not DEADLINE_EXCEEDED) proves the error came from the server dying.
            with pytest.raises(VerifierServiceError, match=rf"{endpoint}.*Score\(1 items\).*UNAVAILABLE"):
                c.score([("60", Task("1", "", "", SLEEPY))])
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    # Regenerate exactly as verifier.proto's header says, into tmp_path, and compare byte for byte.
    (tmp_path / "verifiers").mkdir()
    (tmp_path / "verifiers" / "verifier.proto").write_bytes((REPO / "verifiers" / "verifier.proto").read_bytes())
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         "verifiers/verifier.proto"],
        cwd=tmp_path, check=True, timeout=120,
    )
    for name in ("verifier_pb2.py", "verifier_pb2.pyi", "verifier_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "verifiers" / name, REPO / "verifiers" / name, shallow=False), (
            f"verifiers/{name} is stale: regenerate it with the command in verifiers/verifier.proto"
        )


def test_builtin_math_through_the_service(client: RemoteVerifierPool) -> None:
    verdicts = client.score([("\\boxed{2}", Task("1", "1+1?", "2", "math")), ("\\boxed{3}", Task("2", "1+1?", "2", "math"))])
    assert [v.score for v in verdicts] == [1.0, 0.0]
