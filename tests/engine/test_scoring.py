"""The verifier pool as Ray actors: real actors, real process workers, a real gRPC service."""

from __future__ import annotations

import pytest

from engine.scoring import score_on_actors, start_verifier_actors
from tests.verifiers.plugins import start_server
from verifiers import Task
from verifiers.config import VerifierConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _items() -> list[tuple[str, Task]]:
    items = []
    for i in range(7):  # odd, so the two shards differ in size
        task = Task(id=f"t{i}", prompt=f"What is {i}+{i}?\n", reference=str(2 * i), verifier="math")
        answer = 2 * i if i % 2 == 0 else 2 * i + 1  # even i right, odd i wrong
        items.append((f"Answer: {answer}", task))
    code = Task(id="code", prompt="", verifier="unit_tests",
                reference={"test": "def check(f):\n    assert f(2) == 4\n", "entry_point": "sq"})
    items.append(("```python\ndef sq(x):\n    return x * x\n```", code))
    return items


EXPECTED = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_two_pool_actors_score_in_order(ray_local) -> None:
    actors = start_verifier_actors(VerifierConfig(workers=1, timeout_s=30.0), count=2)
    try:
        verdicts = score_on_actors(actors, _items())
        assert [v.score for v in verdicts] == EXPECTED
        metrics = ray_local.get(actors[0].metrics.remote())
        assert metrics["verifier/math/count"] >= 1
    finally:
        ray_local.get([a.close.remote() for a in actors])
        for actor in actors:
            ray_local.kill(actor)


def test_actor_as_client_of_grpc_service(ray_local) -> None:
    proc, endpoint = start_server(workers=1, timeout_s=30.0)
    try:
        (actor,) = start_verifier_actors(VerifierConfig(endpoint=endpoint, timeout_s=30.0))
        assert [v.score for v in score_on_actors([actor], _items())] == EXPECTED
        ray_local.kill(actor)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
