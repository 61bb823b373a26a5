"""Preference training on one rank (`stage=dpo`): one optimizer step on a shard of (chosen, rejected) pairs.

A pair batch holds, per side, the rows of a supervised batch (`chosen_input_ids`, `chosen_attention_mask`,
`chosen_loss_mask`, and the same for `rejected`), all (N, T) with one T, and -- for the losses that use
a reference -- `ref_chosen_logps` / `ref_rejected_logps` (N,): the frozen reference's sequence
log-probabilities, which the engine computes once before training and passes with every batch, so no
reference model lives next to the policy.

Each micro-batch is one forward pass. With `LearnerConfig.preference_shared_prefix` (the default) a pair
is ONE row: its prompt once, then the chosen response, then the rejected one, under a block mask -- each
response attends to the prompt and to itself, never to the other -- with the positions of both
responses continuing from the prompt's end; the first rejected token is scored from the prompt's last
token. That is the same computation as two rows (the sequence log-probabilities agree to ~1e-6 in fp32,
`tests/learner/test_preference_step.py`) on P + C + R tokens instead of 2P + C + R (here ~1/3 fewer).
It needs an attention that takes a custom mask (`sdpa` or `eager`); otherwise, or when a pair's two
rows do not share their prompt tokens, the batch runs as 2b rows, chosen then rejected, as TRL's
concatenated forward does. The loss is `learner.algos.preference_loss`
(picked by `LearnerConfig.preference_loss`) plus, with `preference_nll_coef > 0`, that weight times the
NLL of the chosen responses normalised by the GLOBAL chosen-token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from learner.algos import PREFERENCE_LOSSES, PairLogps, PreferenceSettings, preference_loss, token_logprobs
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

        def micro_loss(rows: slice) -> tuple[Tensor, dict[str, float]]:
            policy = self._pair_forward(batch, rows)
            reference = None
            if uses_reference:
                reference = PairLogps(batch["ref_chosen_logps"][rows].to(self.device),
                                      batch["ref_rejected_logps"][rows].to(self.device),
                                      policy.chosen_tokens, policy.rejected_tokens)
            loss, metrics = preference_loss(name, policy, reference, settings, num_pairs)
            if nll_coef > 0:  # the chosen responses' summed log-probabilities are the NLL's numerator
                nll = -policy.chosen.sum() / num_chosen_tokens
                loss = loss + nll_coef * nll
                metrics |= {"learner/chosen_nll": float(nll), "learner/loss": float(loss)}
            seq_tokens = sum(float(batch[f"{side}_attention_mask"][rows].sum()) for side in SIDES)
            return loss, metrics | {"learner/seq_tokens": seq_tokens, "learner/pairs": float(rows.stop - rows.start)}

        return self._optimizer_step(pairs, micro_loss)

    @torch.no_grad()
    def pair_logps(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sequence log-probabilities under the current weights, on CPU: `chosen`, `rejected` (N,) sums
        over the response tokens, and their token counts `chosen_tokens`, `rejected_tokens`.

        Under ZeRO-3 every rank must call this with the same number of pairs.
        """
        pairs = check_pairs(batch)
        self.engine.eval()
        parts = [self._pair_forward(batch, rows) for rows in self._micro_slices(pairs)]
        return {field: torch.cat([getattr(p, field).cpu() for p in parts]) if parts else torch.zeros(0)
                for field in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}

    def _pair_forward(self, batch: dict[str, Tensor], rows: slice) -> PairLogps:
        """One forward pass over the pairs `rows` (one row per pair, or two: see the module docstring)."""
        attention = getattr(self.engine.module.config, "_attn_implementation", None)
        if self.cfg.preference_shared_prefix and attention in ("sdpa", "eager"):
            shared = shared_prefix_rows(batch, rows)
            if shared is not None:
                mask = shared.allowed[:, None]  # (b, 1, T, T)
                if attention == "eager":  # eager attention adds the mask to its scores
                    mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
                logits = self.engine(input_ids=shared.input_ids.to(self.device), attention_mask=mask.to(self.device),
                                     position_ids=shared.position_ids.to(self.device), use_cache=False).logits
                logprobs = shared.logprobs(logits)
                chosen, rejected = (shared.segment == 1).to(self.device), (shared.segment == 2).to(self.device)
                return PairLogps((logprobs * chosen).sum(-1), (logprobs * rejected).sum(-1),
                                 chosen.sum(-1).float(), rejected.sum(-1).float())
        ids = torch.cat([batch[f"{side}_input_ids"][rows] for side in SIDES])  # (2b, T)
        attention_mask = torch.cat([batch[f"{side}_attention_mask"][rows] for side in SIDES])
        masks = torch.cat([batch[f"{side}_loss_mask"][rows] for side in SIDES]).to(self.device)
        logprobs = self._forward_logprobs(ids, attention_mask)  # (2b, T)
        sums, counts = (logprobs * masks).sum(-1), masks.sum(-1)  # (2b,)
        b = ids.shape[0] // 2
        return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])


@dataclass(frozen=True)
class SharedPrefixRows:
    """Pairs as one row each: prompt, chosen, rejected (see the module docstring)."""

    input_ids: Tensor  # (b, T)
    position_ids: Tensor  # (b, T)
    segment: Tensor  # (b, T): 0 prompt, 1 chosen, 2 rejected, -1 padding
    allowed: Tensor  # (b, T, T) bool: may query i attend to key j
    first_rejected: Tensor  # (b,) the row index of the first rejected token
    prompt_end: Tensor  # (b,) the row index of the prompt's last token

    def logprobs(self, logits: Tensor) -> Tensor:
        """log p(token t | what it attends to), (b, T): the usual shift by one, except that the first
        rejected token is predicted from the prompt's last position."""
        logprobs = token_logprobs(logits, self.input_ids.to(logits.device))  # (b, T)
        rows = torch.arange(logits.shape[0], device=logits.device)
        from_prompt = logits[rows, self.prompt_end.to(logits.device)].float()  # (b, V)
        target = self.input_ids[rows.cpu(), self.first_rejected].to(logits.device)
        fixed = from_prompt.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(from_prompt, dim=-1)
        return logprobs.index_put((rows, self.first_rejected.to(logits.device)), fixed)


def shared_prefix_rows(batch: dict[str, Tensor], rows: slice) -> SharedPrefixRows | None:
    """The pairs `rows` of a preference batch as one row each, or None when a pair's chosen and rejected
    rows do not start with the same prompt tokens."""
    pieces = []
    for i in range(*rows.indices(batch["chosen_input_ids"].shape[0])):
        sides = []
        for side in SIDES:
            ids, loss = batch[f"{side}_input_ids"][i], batch[f"{side}_loss_mask"][i].bool()
            start = int(loss.nonzero()[0])  # the prompt is everything before the first loss token
            sides.append((ids[:start], ids[loss]))
        (prompt, chosen), (other_prompt, rejected) = sides
        if not torch.equal(prompt, other_prompt):
            return None
        pieces.append((prompt, chosen, rejected))
    width = max(len(p) + len(c) + len(r) for p, c, r in pieces)
    b = len(pieces)
    input_ids = torch.zeros(b, width, dtype=torch.long)
    position_ids = torch.zeros(b, width, dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)
    for i, (prompt, chosen, rejected) in enumerate(pieces):
        p, c, r = len(prompt), len(chosen), len(rejected)
        input_ids[i, : p + c + r] = torch.cat([prompt, chosen, rejected])
        position_ids[i, : p + c] = torch.arange(p + c)
        position_ids[i, p + c : p + c + r] = torch.arange(p, p + r)
        segment[i, :p], segment[i, p : p + c], segment[i, p + c : p + c + r] = 0, 1, 2
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    key, query = segment[:, None, :], segment[:, :, None]
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))  # (b, T, T)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax row
    lengths = torch.tensor([(len(p), len(c)) for p, c, _ in pieces])
    return SharedPrefixRows(input_ids, position_ids, segment, allowed, first_rejected=lengths.sum(-1),
                            prompt_end=lengths[:, 0] - 1)
