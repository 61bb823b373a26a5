"""Preference training on one rank (`stage=dpo`): one optimizer step on a shard of (chosen, rejected) pairs.

A pair batch holds, per side, the rows of a supervised batch (`chosen_input_ids`, `chosen_attention_mask`,
`chosen_loss_mask`, and the same for `rejected`), all (N, T) with one T, and -- for the losses that use
a reference -- `ref_chosen_logps` / `ref_rejected_logps` (N,): the frozen reference's sequence
log-probabilities, which the engine computes once before training and passes with every batch, so no
reference model lives next to the policy. Each micro-batch runs chosen and rejected rows through one
forward pass (2b rows), as TRL's concatenated forward does. The loss is `learner.algos.preference_loss`
(picked by `LearnerConfig.preference_loss`) plus, with `preference_nll_coef > 0`, that weight times the
NLL of the chosen responses normalised by the GLOBAL chosen-token count.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from learner.algos import PREFERENCE_LOSSES, PairLogps, PreferenceSettings, preference_loss
from learner.plan import REFERENCE_KEYS, SIDES, check_pairs
from learner.rank import LearnerRank


class PreferenceSteps(LearnerRank):
    """`train_preference_step` and `pair_logps` on the rank `LearnerRank` sets up."""

    def train_preference_step(self, batch: dict[str, Tensor], num_pairs: int, num_chosen_tokens: int) -> dict[str, float]:
        """One optimizer step on this rank's shard of a global batch of `num_pairs` pairs."""
        pairs = check_pairs(batch, self.cfg.micro_batch_size)
        name = self.cfg.preference_loss
        uses_reference = PREFERENCE_LOSSES[name].uses_reference
        if uses_reference and any(k not in batch for k in REFERENCE_KEYS):
            raise ValueError(f"preference loss {name!r} needs {list(REFERENCE_KEYS)} in the batch (the engine "
                             "computes them with the starting weights before the first step)")
        settings = PreferenceSettings(self.cfg.preference_beta, self.cfg.preference_label_smoothing, self.cfg.simpo_gamma)
        nll_coef = self.cfg.preference_nll_coef
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]

        def micro_loss(rows: slice) -> tuple[Tensor, dict[str, float]]:
            policy, logprobs, masks = self._pair_forward(batch, rows)
            reference = None
            if uses_reference:
                reference = PairLogps(batch["ref_chosen_logps"][rows].to(self.device),
                                      batch["ref_rejected_logps"][rows].to(self.device),
                                      policy.chosen_tokens, policy.rejected_tokens)
            loss, metrics = preference_loss(name, policy, reference, settings, num_pairs)
            if nll_coef > 0:
                chosen_rows = slice(0, rows.stop - rows.start)
                nll = -(logprobs[chosen_rows] * masks[chosen_rows]).sum() / num_chosen_tokens
                loss = loss + nll_coef * nll
                metrics |= {"learner/chosen_nll": float(nll), "learner/loss": float(loss)}
            seq_tokens = sum(float(batch[f"{side}_attention_mask"][rows].sum()) for side in SIDES)
            return loss, metrics | {"learner/seq_tokens": seq_tokens, "learner/pairs": float(rows.stop - rows.start)}

        totals, grad_norm = self._accumulate(self.engine, pairs, micro_loss)
        self.step += 1
        elapsed = time.perf_counter() - start
        return totals | {
            "learner/grad_norm": grad_norm,
            "learner/lr": float(lr),
            "learner/step": float(self.step),
            "perf/learner_step_s": elapsed,
            "perf/learner_tokens_per_s": totals["learner/seq_tokens"] / elapsed,
        }

    @torch.no_grad()
    def pair_logps(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sequence log-probabilities under the current weights, on CPU: `chosen`, `rejected` (N,) sums
        over the response tokens, and their token counts `chosen_tokens`, `rejected_tokens`.

        Under ZeRO-3 every rank must call this with the same number of pairs.
        """
        pairs = check_pairs(batch)
        self.engine.eval()
        parts = []
        for start in range(0, pairs, self.cfg.micro_batch_size):
            policy, _, _ = self._pair_forward(batch, slice(start, min(start + self.cfg.micro_batch_size, pairs)))
            parts.append(policy)
        return {field: torch.cat([getattr(p, field).cpu() for p in parts]) if parts else torch.zeros(0)
                for field in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}

    def _pair_forward(self, batch: dict[str, Tensor], rows: slice) -> tuple[PairLogps, Tensor, Tensor]:
        """One forward pass over the chosen and rejected rows `rows`: (their PairLogps, the (2b, T) token
        log-probabilities with chosen rows first, the matching loss masks)."""
        ids = torch.cat([batch[f"{side}_input_ids"][rows] for side in SIDES])  # (2b, T)
        attention = torch.cat([batch[f"{side}_attention_mask"][rows] for side in SIDES])
        masks = torch.cat([batch[f"{side}_loss_mask"][rows] for side in SIDES]).to(self.device)
        logprobs = self._forward_logprobs(ids, attention)  # (2b, T)
        sums, counts = (logprobs * masks).sum(-1), masks.sum(-1)  # (2b,)
        b = ids.shape[0] // 2
        return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:]), logprobs, masks
