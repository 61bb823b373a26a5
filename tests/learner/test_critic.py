"""`learner.critic.ValueModel`: a zero-initialised head (every value starts at 0) on the policy's body,
with `values[:, t]` read from the hidden state at t - 1 (the state before token t is generated)."""

from __future__ import annotations

import torch
from transformers import AutoModel

from learner.critic import ValueModel
from learner.reference import position_ids_from_mask
from tests.learner.conftest import make_batch


def test_values_start_at_zero_and_are_shifted_by_one_token(tiny_model_dir: str) -> None:
    critic = ValueModel(tiny_model_dir)
    batch = make_batch(rows=3, seed=1, pad_right=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        assert torch.count_nonzero(critic(ids, mask)) == 0  # the zero head: every value 0 before training
        torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
        values = critic(ids, mask)  # (B, T)
        body = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                      use_cache=False).last_hidden_state  # (B, T, H)
        after = critic.head(hidden).squeeze(-1)  # the value after reading token t
    assert values.shape == ids.shape
    assert torch.all(values[:, 0] == 0)  # nothing comes before token 0
    torch.testing.assert_close(values[:, 1:], after[:, :-1], atol=1e-5, rtol=1e-5)
    assert critic.head.weight.requires_grad and any(p.requires_grad for p in critic.body.parameters())
