"""PPO's critic: a value model trained by its own DeepSpeed engine on every learner rank.

`ValueModel` is the policy's transformer body (`AutoModel`, no LM head) loaded from a checkpoint
directory — the policy's own starting weights by default, so the critic starts as a copy of the
policy, or a separate checkpoint (`learner.critic.path`) — plus a linear value head `hidden -> 1`,
initialised to zero (every value starts at 0, the critic learns the scale of the rewards from there).

Alignment: `values[:, t]` is the value of the state before token t is generated, read from the hidden
state at position t - 1, the same shift by which the logits at t - 1 score token t (`values[:, 0]` is
0: nothing predicts token 0). GAE then reads values at exactly the loss-mask positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModel

from learner.reference import position_ids_from_mask


class ValueModel(nn.Module):
    """Transformer body + a zero-initialised linear head: `forward(ids, mask) -> values (b, T)`."""

    def __init__(self, model_dir: str) -> None:
        super().__init__()
        self.body = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        self.head = nn.Linear(self.body.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state  # (b, T, H)
        values = self.head(hidden).squeeze(-1)  # (b, T): the value after reading token t
        return torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1)  # before token t
