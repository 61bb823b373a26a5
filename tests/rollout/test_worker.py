"""`RolloutWorker` with the `hf` backend: logprobs vs a transformers forward, finish reasons, seeds,
prompt tokenization, in-place weight loads. (The vLLM backend is tested in a Ray actor: test_actor.py.)"""

from __future__ import annotations

import time

import pytest

from engine.data import encode_prompt
from rollout.config import RolloutConfig
from rollout.types import Sampling
from rollout.worker import RolloutWorker, task_seed
from tests.rollout.conftest import (
    make_tasks,
    perturbed_state,
    reference_greedy,
    reference_logprobs,
    with_extra_eos,
)
from verifiers.base import Task

GREEDY = Sampling(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def worker(model_dir: str) -> RolloutWorker:
    return RolloutWorker(RolloutConfig(backend="hf", max_model_len=128), model_dir)


def test_sampled_logprobs_equal_a_transformers_forward(worker, model_dir):
    tasks = make_tasks()
    responses = worker.generate(
        tasks, n=3, sampling=Sampling(temperature=1.0, top_p=0.9, max_tokens=10, seed=7)
    )
    assert [r.task_id for r in responses] == ["t0", "t0", "t0", "t1", "t1", "t1", "t2", "t2", "t2"]
    for r in responses:
        assert r.prompt_ids == encode_prompt(worker.tokenizer, tasks[int(r.task_id[1])].prompt)
        assert r.weight_version == 0 and len(r.response_ids) == len(r.rollout_logprobs) > 0
        # raw logprobs: the temperature and top-p used for sampling do not enter them
        expected = reference_logprobs(model_dir, r.prompt_ids, r.response_ids)
        assert r.rollout_logprobs == pytest.approx(expected, abs=1e-4)


def test_greedy_matches_generate_and_runs_to_length(worker, model_dir):
    for r in worker.generate(make_tasks(), n=1, sampling=GREEDY):
        assert worker.tokenizer.eos_token_id not in r.response_ids  # precondition of this fixed model
        assert r.response_ids == reference_greedy(model_dir, r.prompt_ids, 8)
        assert r.finish_reason == "length" and len(r.response_ids) == 8
        assert r.text == worker.tokenizer.decode(r.response_ids)


def test_stop_string_cuts_text_and_keeps_the_token(worker):
    task = make_tasks()[:1]
    full = worker.generate(task, n=1, sampling=GREEDY)[0]
    stop = full.text[3:5]  # a piece of the greedy text, so greedy must stop at it
    assert stop
    cut = worker.generate(task, n=1, sampling=Sampling(temperature=0.0, max_tokens=8, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    # ids: the greedy prefix up to the token that completed the stop string
    assert cut.response_ids == full.response_ids[: len(cut.response_ids)]
    assert stop in worker.tokenizer.decode(cut.response_ids) and len(cut.response_ids) < 8


def test_eos_stops_and_is_kept_in_the_ids(model_dir, tmp_path):
    plain = RolloutWorker(RolloutConfig(backend="hf", max_model_len=128), model_dir)
    full = plain.generate(make_tasks()[:1], n=1, sampling=GREEDY)[0]
    # make the 4th greedy token an eos (first occurrence at index 3, so generation stops there)
    stop_token = full.response_ids[3]
    assert stop_token not in full.response_ids[:3]
    eos_dir = with_extra_eos(model_dir, stop_token, tmp_path / "eos")
    worker = RolloutWorker(RolloutConfig(backend="hf", max_model_len=128), eos_dir)
    r = worker.generate(make_tasks()[:1], n=1, sampling=GREEDY)[0]
    assert r.finish_reason == "stop"
    assert r.response_ids == full.response_ids[:4]


def test_seeds_reproduce_and_do_not_depend_on_the_batch(worker):
    tasks = make_tasks()
    sampling = Sampling(temperature=1.0, max_tokens=8, seed=3)
    a = worker.generate(tasks, n=4, sampling=sampling)
    b = worker.generate(tasks, n=4, sampling=sampling)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    alone = worker.generate(tasks[2:], n=4, sampling=sampling)  # same task, other position/batch
    assert [r.response_ids for r in alone] == [r.response_ids for r in a[8:]]
    other = worker.generate(tasks, n=4, sampling=Sampling(temperature=1.0, max_tokens=8, seed=4))
    assert [r.response_ids for r in other] != [r.response_ids for r in a]
    # the G samples of one prompt are not copies of each other
    assert len({tuple(r.response_ids) for r in a[:4]}) > 1


def test_tiny_top_p_is_greedy(worker):
    greedy = worker.generate(make_tasks(), n=1, sampling=GREEDY)
    nucleus = worker.generate(
        make_tasks(), n=2, sampling=Sampling(temperature=1.0, top_p=1e-6, max_tokens=8, seed=0)
    )
    assert [r.response_ids for r in nucleus] == [r.response_ids for r in greedy for _ in range(2)]


def test_max_tokens_is_capped_by_max_model_len(model_dir):
    worker = RolloutWorker(RolloutConfig(backend="hf", max_model_len=12), model_dir)
    r = worker.generate(make_tasks()[:1], n=1, sampling=Sampling(temperature=0.0, max_tokens=50))[0]
    assert len(r.prompt_ids) == 8  # "What", " is", " ", "3", "+", "4", "?", "\n"
    assert len(r.prompt_ids) + len(r.response_ids) == 12 and r.finish_reason == "length"


def test_prompt_errors_name_the_task(worker):
    too_long = Task(id="long", prompt="What is 1+1?\n" * 40, reference="", verifier="math")
    with pytest.raises(ValueError, match=r"task 'long': the prompt is \d+ tokens.*max_model_len=128"):
        worker.generate([too_long], n=1, sampling=GREEDY)
    chat = Task(id="chat", prompt=[{"role": "user", "content": "hi"}], reference="", verifier="math")
    with pytest.raises(ValueError, match="chat template"):
        worker.generate([chat], n=1, sampling=GREEDY)


def test_load_weights_serves_the_new_version(worker, model_dir):
    state = perturbed_state(model_dir)
    started = time.perf_counter()
    took = worker.load_weights(state, version=5)
    assert 0 < took < time.perf_counter() - started  # the load's own seconds, inside the call's
    assert worker.version == 5
    for r in worker.generate(make_tasks(), n=1, sampling=GREEDY):
        assert r.weight_version == 5
        assert r.rollout_logprobs == pytest.approx(
            reference_logprobs(model_dir, r.prompt_ids, r.response_ids, state), abs=1e-4
        )
    with pytest.raises(KeyError, match="'nope' is not a parameter"):
        worker.load_weights({"nope": state["model.norm.weight"]}, version=6)
    assert worker.version == 5


def test_task_seed_is_stable_and_mixes_the_task_id():
    assert task_seed(None, "t0") is None
    assert task_seed(1, "t0") == task_seed(1, "t0")
    assert len({task_seed(1, "t0"), task_seed(1, "t1"), task_seed(2, "t0")}) == 3
    # crc32(b"") == 0, so the empty id leaves seed * 1_000_003 (mod 2**31)
    assert task_seed(2, "") == 2_000_006
