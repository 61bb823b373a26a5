"""Pure tensor functions for the learner: log-probabilities, losses, advantages, KL, aggregation.

Every table is a plain dict literal (no registration decorators), so every process that imports
this module sees the same entries; a config picks an entry by name.

- `LOSSES`: the supervised losses the learner runs today, `fn(logprobs, loss_mask, num_tokens)
  -> (loss, metrics)`.
- `POLICY_LOSSES`: the RL policy losses (`ppo_clip`, `gspo`), `fn(logprobs, old_logprobs,
  advantages, loss_mask, *, ...) -> (loss, metrics)`; the learner's RL call path (the RL-loop issue)
  passes the global `num_tokens` / `num_seqs` they normalise by.
- `ADVANTAGES` (outcome estimators `grpo`, `dr_grpo`, `rloo`, `reinforce_pp`, ...) and `ESTIMATORS`
  (those on per-token rewards, plus PPO's `gae`), `clipped_value_loss` (the critic's), `AGGREGATIONS`, `KL_ESTIMATORS` (`k1`, `k2`, `k3`).
- `PREFERENCE_LOSSES` (`dpo`, `ipo`, `hinge`, `simpo`) and `preference_loss`: the pairwise losses of
  `stage=dpo` on sequence log-probabilities (`PairLogps`).
- DAPO's reward shaping and group filter: `overlong_penalty`, `informative_groups`.
"""

from learner.algos.advantages import (
    ADVANTAGES,
    ESTIMATORS,
    dr_grpo_advantages,
    gae_advantages,
    group_advantages,
    masked_whiten,
    rloo_advantages,
    token_advantages,
    token_rewards,
)
from learner.algos.aggregation import AGGREGATIONS, aggregate
from learner.algos.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3
from learner.algos.policy import POLICY_LOSSES, entropy_from_logits, gspo_loss, ppo_clip_loss, token_entropy
from learner.algos.preference import (
    PREFERENCE_LOSSES,
    PairLogps,
    PreferenceSettings,
    bradley_terry_loss,
    preference_loss,
)
from learner.algos.sft import nll_loss, token_logprobs
from learner.algos.shaping import informative_groups, overlong_penalty
from learner.algos.value import clipped_value_loss

LOSSES = {"nll": nll_loss}

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "ESTIMATORS", "KL_ESTIMATORS", "LOSSES", "POLICY_LOSSES",
    "PREFERENCE_LOSSES", "PairLogps", "PreferenceSettings", "aggregate", "bradley_terry_loss", "clipped_value_loss",
    "dr_grpo_advantages", "entropy_from_logits", "gae_advantages", "group_advantages", "gspo_loss",
    "informative_groups", "kl_k1", "kl_k2", "kl_k3", "masked_whiten", "nll_loss", "overlong_penalty",
    "ppo_clip_loss", "preference_loss", "rloo_advantages", "token_advantages", "token_entropy",
    "token_logprobs", "token_rewards",
]
