"""`learner.actor.LearnerActor`: the Ray shell forwards to its `LearnerWorker` — started as a real actor,
it reports its node, and scores a batch as the frozen starting weights do."""

from __future__ import annotations

import pytest
import torch

from learner.actor import LearnerActor
from learner.config import LearnerConfig
from learner.group import free_port
from learner.reference import ReferenceModel
from tests.learner.conftest import make_batch

pytestmark = [pytest.mark.ray]


def test_one_rank_as_an_actor_scores_like_its_starting_weights(ray_local, tiny_model_dir: str) -> None:
    ray = ray_local
    cfg = LearnerConfig(batch_size=4, micro_batch_size=2)
    actor = LearnerActor.remote(cfg, tiny_model_dir, 0, 1, 10, free_port())  # type: ignore[attr-defined]
    try:
        assert ray.get(actor.ready.remote()) is True
        assert ray.get(actor.node_id.remote()) == ray.get_runtime_context().get_node_id()  # one node here
        batch = make_batch(rows=4, seed=7, pad_right=2)
        got = ray.get(actor.logprobs.remote(batch))  # (B, T)
        ref = ReferenceModel(tiny_model_dir, torch.float32, torch.device("cpu"), micro_batch_size=4)
        expected = ref.logprobs(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=1e-4)
        state = ray.get(actor.state_dict_for_rollout.remote())
        torch.testing.assert_close(state["model.norm.weight"], ref.model.state_dict()["model.norm.weight"])
    finally:
        ray.get(actor.close.remote())
        ray.kill(actor)
