"""Supervised training on one rank: one optimizer step on a shard of a packed or SFT batch, its loss
normalised by the GLOBAL loss-token count (`learner.algos.LOSSES`, picked by `learner.loss`)."""

from __future__ import annotations

from torch import Tensor

from learner.rank import LearnerRank, check_batch


class SupervisedSteps(LearnerRank):
    """`train_step` (pretraining and SFT) on the rank `LearnerRank` sets up."""

    def train_step(self, batch: dict[str, Tensor], num_tokens: int | None = None) -> dict[str, float]:
        """One optimizer step on this rank's shard of the global batch.

        `num_tokens` is the global batch's loss-token count (all ranks); it defaults to this shard's
        own count, which is right when world_size is 1.
        """
        input_ids, attention_mask, loss_mask = check_batch(batch, self.cfg.micro_batch_size)
        if num_tokens is None:
            num_tokens = int(loss_mask.sum())

        def micro_loss(rows: slice) -> tuple[Tensor, dict[str, float]]:
            logprobs = self._forward_logprobs(input_ids[rows], attention_mask[rows])  # (b, T)
            loss, metrics = self.loss_fn(logprobs, loss_mask[rows].to(self.device), num_tokens)
            # loss metrics are this micro-batch's share of global sums, so they add up
            return loss, metrics | {"learner/loss": loss.item(), "learner/tokens": float(loss_mask[rows].sum()),
                                    "learner/seq_tokens": float(attention_mask[rows].sum())}

        return self._optimizer_step(input_ids.shape[0], micro_loss)
