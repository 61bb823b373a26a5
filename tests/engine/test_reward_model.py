"""The `reward_model` verifier (a stage=rm export scoring responses), the pool actor that runs batched
verifiers on whole lists, and the RL reward as a weighted sum of verifiers (`verifier.rewards`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.models import ModelConfig, prepare_model_dir
from engine.reward_model import RewardModelVerifier
from engine.scoring import VerifierPoolActor
from verifiers.base import Task
from verifiers.config import RewardComponent, VerifierConfig

CORPUS = [f"What is {a}+{b}?\n\\boxed{{{a + b}}}" for a in range(20) for b in range(20)]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama under a one-label head, saved as stage=rm exports it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = prepare_model_dir(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                                         num_kv_heads=2, vocab_size=300), CORPUS, tmp_path_factory.mktemp("base") / "model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(base).pad_token_id or 0
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def task(i: int, verifier: str = "math") -> Task:
    return Task(id=f"t{i}", prompt=f"What is {i}+1?\n", reference=str(i + 1), verifier=verifier)


def direct_reward(rm_dir: str, prompt: str, response: str) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    ids = tokenizer.encode(prompt) + tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_scores_are_the_models_reward_through_a_sigmoid_in_batches_or_alone(rm_dir: str) -> None:
    verifier = RewardModelVerifier(rm_dir, batch_size=2)
    items = [("\\boxed{2}", task(1)), ("\\boxed{33} is my answer", task(2)), ("4", task(3))]
    batched = verifier.verify_batch(items)  # two batches, padded differently
    for (response, t), verdict in zip(items, batched):
        reward = direct_reward(rm_dir, t.prompt, response)
        assert verdict.score == pytest.approx(1 / (1 + math.exp(-reward)), abs=1e-5)
        assert verifier.verify(response, t).score == pytest.approx(verdict.score, abs=1e-5)
    # a prompt past max_len is an infra error, never a score; the others of its batch are scored as before
    short = RewardModelVerifier(rm_dir, batch_size=8, max_len=16)
    long_task = Task(id="long", prompt="What is 1+1? " * 20, reference="2", verifier="math")
    mixed = short.verify_batch([items[0], ("\\boxed{2}", long_task), items[2]])
    assert mixed[1].score is None and "max_len=16" in mixed[1].reason
    assert [mixed[0].score, mixed[2].score] == pytest.approx([batched[0].score, batched[2].score], abs=1e-5)
    raw = RewardModelVerifier(rm_dir, normalise="none")
    assert raw.verify(*items[0]).score == pytest.approx(direct_reward(rm_dir, task(1).prompt, "\\boxed{2}"), abs=1e-5)
    assert raw.score_range == (-math.inf, math.inf)


def test_a_bad_directory_or_option_is_named(tmp_path: Path, rm_dir: str) -> None:
    with pytest.raises(FileNotFoundError, match="reward_model.path"):
        RewardModelVerifier(str(tmp_path))
    with pytest.raises(ValueError, match="normalise"):
        RewardModelVerifier(rm_dir, normalise="tanh")


def test_the_pool_actor_runs_batched_verifiers_itself_and_the_rest_on_its_workers(rm_dir: str) -> None:
    actor = VerifierPoolActor(VerifierConfig(workers=1, options={"reward_model": {"path": rm_dir}}))
    try:
        items = [("\\boxed{2}", task(1)), ("\\boxed{2}", task(1, "reward_model")), ("\\boxed{9}", task(2))]
        math_right, rm, math_wrong = actor.score(items)
        assert (math_right.score, math_wrong.score) == (1.0, 0.0)
        assert 0.0 < rm.score < 1.0 and "reward" in rm.reason
    finally:
        actor.close()
    broken = VerifierPoolActor(VerifierConfig(workers=1, options={"reward_model": {"path": "/nonexistent"}}))
    try:
        (verdict,) = broken.score([("\\boxed{2}", task(1, "reward_model"))])
        assert verdict.score is None and verdict.error == "build" and "reward_model.path" in verdict.reason
    finally:
        broken.close()


def test_the_rl_reward_is_the_weighted_sum_of_its_terms(ray_local: Any, rm_dir: str) -> None:
    from engine.collector_base import composed_score
    from engine.scoring import start_verifier_actors
    from rollout.types import Response

    tasks = [task(1), task(2)]
    texts = ["\\boxed{2}", "\\boxed{5}", "\\boxed{3}", "\\boxed{3}"]  # G = 2 per task
    responses = [Response(tasks[i // 2].id, [1], [2], [0.0], text, "stop", 0) for i, text in enumerate(texts)]
    actors = start_verifier_actors(VerifierConfig(workers=1, options={"reward_model": {"path": rm_dir}}))
    terms = [RewardComponent("task", 1.0), RewardComponent("reward_model", 0.5)]
    rewards, judged, metrics = composed_score(actors, tasks, responses, 2, terms)
    rm = RewardModelVerifier(rm_dir)
    right = [1.0, 0.0, 1.0, 1.0]  # the math verifier: 1+1 = 2, not 5; 2+1 = 3 twice
    flat = [r + 0.5 * rm.verify(t, tasks[i // 2]).score for i, (r, t) in enumerate(zip(right, texts))]
    expected = [flat[:2], flat[2:]]
    assert torch.allclose(rewards, torch.tensor(expected), atol=1e-5)
    assert metrics["reward/math"] == pytest.approx(0.75)  # 3 of 4 right
    assert 0.0 < metrics["reward/reward_model"] < 1.0 and len(judged) == 6  # 3 distinct texts x 2 terms
    plain, _, none = composed_score(actors, tasks, responses, 2, [])
    assert none == {} and plain.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    # a weight-0 term only watches: the reward model alone trains, the math verifier is logged beside it
    watched, _, logged = composed_score(actors, tasks, responses, 2, [RewardComponent("reward_model", 1.0),
                                                                       RewardComponent("task", 0.0)])
    assert torch.allclose(watched, (rewards - plain) * 2, atol=1e-5) and logged["reward/math"] == pytest.approx(0.75)
