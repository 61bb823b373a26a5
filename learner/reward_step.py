"""Reward-model training on one rank (`stage=rm`): one optimizer step of the Bradley-Terry loss on pairs.

The learner's model is then the causal LM's body under a scalar head (`LearnerConfig.head=reward`,
`learner.rank.reward_model`); its forward pass reads one reward per row where transformers reads it
(the last token that is not padding). A batch is a preference batch (`learner.plan.PAIR_KEYS`) with an
optional `margin` (N,): the loss per pair is -log sigma(r_chosen - r_rejected - margin) (Bradley-Terry;
the margin as in Llama 2's reward models), summed and divided by the GLOBAL pair count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.algos import bradley_terry_loss
from learner.plan import SIDES, check_pairs
from learner.rank import LearnerRank


class RewardSteps(LearnerRank):
    """`train_reward_step` and `pair_rewards` on a rank whose model has the scalar head."""

    def train_reward_step(self, batch: dict[str, Tensor], num_pairs: int) -> dict[str, float]:
        """One optimizer step on this rank's shard of a global batch of `num_pairs` pairs."""
        if self.cfg.head != "reward":
            raise ValueError("train_reward_step needs the scalar head: LearnerConfig.head=reward (stage=rm sets it)")
        pairs = check_pairs(batch, self.cfg.micro_batch_size)

        def micro_loss(rows: slice) -> tuple[Tensor, dict[str, float]]:
            chosen, rejected = self._pair_rewards(batch, rows)
            margin = batch["margin"][rows].to(self.device) if "margin" in batch else None
            loss, metrics = bradley_terry_loss(chosen, rejected, num_pairs, margin)
            seq_tokens = sum(float(batch[f"{side}_attention_mask"][rows].sum()) for side in SIDES)
            return loss, metrics | {"learner/seq_tokens": seq_tokens, "learner/pairs": float(rows.stop - rows.start)}

        return self._optimizer_step(pairs, micro_loss)

    @torch.no_grad()
    def pair_rewards(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The rewards of both sides of every pair, `chosen` and `rejected` (N,) each, on CPU."""
        pairs = check_pairs(batch)
        self.engine.eval()
        parts = [self._pair_rewards(batch, rows) for rows in self._micro_slices(pairs)]
        return {side: torch.cat([p[i].float().cpu() for p in parts]) if parts else torch.zeros(0)
                for i, side in enumerate(SIDES)}

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """One reward per row (b,), read as transformers reads a one-label classifier's logit."""
        attention_mask = attention_mask.to(self.device)
        out = self.engine(input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=False)
        return out.logits.squeeze(-1)  # type: ignore[no-any-return]

    def _pair_rewards(self, batch: dict[str, Tensor], rows: slice) -> tuple[Tensor, Tensor]:
        ids = torch.cat([batch[f"{side}_input_ids"][rows] for side in SIDES])  # (2b, T)
        mask = torch.cat([batch[f"{side}_attention_mask"][rows] for side in SIDES])
        rewards = self.rewards(ids, mask)  # (2b,)
        b = ids.shape[0] // 2
        return rewards[:b], rewards[b:]
