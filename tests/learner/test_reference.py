"""`learner.reference`: the frozen reference policy scores exactly what the model it was loaded from
scores, whatever the micro-batch size, and never trains."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from learner.algos import token_logprobs
from learner.reference import ReferenceModel, position_ids_from_mask
from tests.learner.conftest import make_batch


def test_position_ids_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    # left padding sits at 0; each row counts from its first real token; right padding keeps counting
    # (it is masked out of attention and the loss anyway)
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_reference_logprobs_match_the_model_and_ignore_micro_batching(tiny_model_dir: str) -> None:
    batch = make_batch(rows=5, seed=3, pad_right=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        mask = batch["attention_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=position_ids_from_mask(mask), use_cache=False).logits
    expected = token_logprobs(logits, batch["input_ids"]).float()  # (B, T)
    for micro in (1, 2, 5):
        ref = ReferenceModel(tiny_model_dir, torch.float32, torch.device("cpu"), micro_batch_size=micro)
        got = ref.logprobs(batch["input_ids"], batch["attention_mask"])
        assert got.shape == batch["input_ids"].shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in ref.model.parameters()) and not ref.model.training
    empty = ref.logprobs(batch["input_ids"][:0], batch["attention_mask"][:0])
    assert empty.shape == (0, batch["input_ids"].shape[1])
