"""One row per pair (`learner.preference_step.shared_prefix_rows`): the layout, and the same sequence
log-probabilities as two rows per pair, through a real transformers model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.algos import token_logprobs
from learner.preference_step import shared_prefix_rows
from learner.reference import position_ids_from_mask
from tests.learner.test_preference_group import BATCHES


def one_pair() -> dict[str, torch.Tensor]:
    # prompt [7, 8], chosen [9, 10], rejected [11] (+ one padding column on the rejected row)
    return {
        "chosen_input_ids": torch.tensor([[7, 8, 9, 10]]), "chosen_attention_mask": torch.tensor([[1, 1, 1, 1]]),
        "chosen_loss_mask": torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
        "rejected_input_ids": torch.tensor([[7, 8, 11, 0]]), "rejected_attention_mask": torch.tensor([[1, 1, 1, 0]]),
        "rejected_loss_mask": torch.tensor([[0.0, 0.0, 1.0, 0.0]]),
    }


def test_layout_prompt_once_then_both_responses_masked_from_each_other() -> None:
    rows = shared_prefix_rows(one_pair(), slice(0, 1))
    assert rows is not None
    assert rows.input_ids.tolist() == [[7, 8, 9, 10, 11]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # the rejected token sits where chosen's first does
    assert rows.segment.tolist() == [[0, 0, 1, 1, 2]]
    assert rows.allowed[0, 4].tolist() == [True, True, False, False, True]  # rejected sees the prompt and itself
    assert rows.allowed[0, 3].tolist() == [True, True, True, True, False]
    assert (rows.first_rejected.tolist(), rows.prompt_end.tolist()) == ([4], [1])


def test_pairs_whose_prompts_differ_run_as_two_rows() -> None:
    batch = one_pair()
    batch["rejected_input_ids"] = torch.tensor([[7, 6, 11, 0]])
    assert shared_prefix_rows(batch, slice(0, 1)) is None


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_one_row_scores_what_two_rows_score(tiny_model_dir: str, attention: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    batch = BATCHES[0]
    with torch.no_grad():
        rows = shared_prefix_rows(batch, slice(0, 8))
        assert rows is not None
        mask = rows.allowed[:, None]
        if attention == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        logits = model(input_ids=rows.input_ids, attention_mask=mask, position_ids=rows.position_ids).logits
        shared = rows.logprobs(logits)
        for side, segment in (("chosen", 1), ("rejected", 2)):
            ids, attention_mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
            separate = token_logprobs(model(input_ids=ids, attention_mask=attention_mask,
                                            position_ids=position_ids_from_mask(attention_mask)).logits, ids)
            want = (separate * batch[f"{side}_loss_mask"]).sum(-1)
            got = (shared * (rows.segment == segment)).sum(-1)
            assert torch.allclose(got, want, atol=1e-4), (side, (got - want).abs().max())
    assert rows.input_ids.shape[1] < 2 * batch["chosen_input_ids"].shape[1]  # fewer tokens than two rows
