"""The preference step through real Ray actors and real DeepSpeed on CPU: 2 ranks (ZeRO-2) reproduce 1 rank
(ZeRO-0), and the sequence log-probabilities it trains on are the token log-probabilities summed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from learner.config import LearnerConfig
from learner.group import LearnerGroup
from tests.learner.conftest import make_batch

pytestmark = pytest.mark.ray

PROMPT = 5  # the first 5 tokens of every row are the prompt (no loss)


def pair_batch(pairs: int, seed: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for side, offset in (("chosen", 0), ("rejected", 1)):
        rows = make_batch(pairs, seed=seed * 2 + offset, pad_right=4 if offset else 0)
        rows["input_ids"][:, :PROMPT] = make_batch(pairs, seed=seed)["input_ids"][:, :PROMPT]  # one prompt per pair
        rows["loss_mask"][:, :PROMPT] = 0
        out |= {f"{side}_{k}": v for k, v in rows.items()}
    gen = torch.Generator().manual_seed(seed)
    out["ref_chosen_logps"] = -50 + torch.randn(pairs, generator=gen)
    out["ref_rejected_logps"] = -50 + torch.randn(pairs, generator=gen)
    return out


BATCHES = [pair_batch(8, seed=40 + i) for i in range(2)]


def config(zero_stage: int, **preference: Any) -> LearnerConfig:
    return LearnerConfig(zero_stage=zero_stage, lr=1e-2, batch_size=8, micro_batch_size=2, **preference)


@pytest.mark.parametrize("preference", [{"preference_loss": "dpo", "preference_nll_coef": 0.5},
                                        {"preference_loss": "simpo", "preference_label_smoothing": 0.1}])
def test_two_ranks_reproduce_one(ray_local: Any, tiny_model_dir: str, preference: dict[str, Any]) -> None:
    runs = []
    for zero_stage, world in ((0, 1), (2, 2)):
        group = LearnerGroup(config(zero_stage, **preference), tiny_model_dir, world_size=world, total_steps=4)
        try:
            runs.append([group.train_preference_step(b) for b in BATCHES])
        finally:
            group.shutdown()
    one, two = runs
    assert one[0]["learner/loss"] > 0 and one[1]["learner/loss"] != one[0]["learner/loss"]
    for key in ("learner/loss", "learner/grad_norm", "rewards/chosen", "rewards/margin", "logps/rejected"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-5), key
    for key in ("rewards/accuracy", "learner/pairs", "learner/seq_tokens", "learner/lr"):
        assert [m[key] for m in two] == [m[key] for m in one], key
    if preference.get("preference_nll_coef"):
        assert one[0]["learner/chosen_nll"] > 0


def test_reward_model_two_ranks_reproduce_one_and_export_what_transformers_loads(
        ray_local: Any, tiny_model_dir: str, tmp_path: Any) -> None:
    from transformers import AutoModelForSequenceClassification

    batches = [{k: v for k, v in b.items() if not k.startswith("ref_")} | {"margin": torch.full((8,), 0.5)}
               for b in BATCHES]
    runs = []
    for zero_stage, world in ((0, 1), (2, 2)):
        group = LearnerGroup(config(zero_stage, head="reward"), tiny_model_dir, world_size=world, total_steps=4)
        try:
            runs.append([group.train_reward_step(b) for b in batches])
            if world == 1:
                rewards = group.pair_rewards(BATCHES[0])
                group.save(str(tmp_path / "rm"))
        finally:
            group.shutdown()
    one, two = runs
    for key in ("learner/loss", "learner/grad_norm", "rewards/chosen", "rewards/margin"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-5), key
    assert one[1]["learner/loss"] != one[0]["learner/loss"]
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "hf")
    with torch.no_grad():
        logits = exported(input_ids=BATCHES[0]["chosen_input_ids"],
                          attention_mask=BATCHES[0]["chosen_attention_mask"]).logits.squeeze(-1)
    assert torch.allclose(logits, rewards["chosen"], atol=1e-5)


def test_pair_logps_sum_the_response_tokens(ray_local: Any, tiny_model_dir: str) -> None:
    group = LearnerGroup(config(0), tiny_model_dir, world_size=1, total_steps=1)
    try:
        batch = {k: v[:3] for k, v in BATCHES[0].items()}  # any number of pairs, not a batch multiple
        scored = group.pair_logps(batch)
        for side in ("chosen", "rejected"):
            tokens = group.logprobs({"input_ids": batch[f"{side}_input_ids"],
                                     "attention_mask": batch[f"{side}_attention_mask"]})
            mask = batch[f"{side}_loss_mask"]
            assert torch.allclose(scored[side], (tokens * mask).sum(-1), atol=1e-4)
            assert scored[f"{side}_tokens"].tolist() == mask.sum(-1).tolist()
    finally:
        group.shutdown()
