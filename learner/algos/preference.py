"""Preference losses on (chosen, rejected) pairs: DPO and its variants, picked by name from `PREFERENCE_LOSSES`.

Pure torch. Inputs are per-pair sequence log-probabilities of the responses -- the sum of the
response tokens' log-probabilities, and the number of those tokens -- under the policy and, for the
losses that use one, under the frozen reference (the SFT weights). With

    d_c = logp_policy(chosen) - logp_ref(chosen),  d_r = the same for rejected,  h = d_c - d_r,

the table holds (b = `beta`, e = `label_smoothing`, g = `gamma`; sigma the logistic function):

| name    | loss per pair                                  | logps                | reference |
|---------|------------------------------------------------|----------------------|-----------|
| `dpo`   | -(1-e) log sigma(b h) - e log sigma(-b h)      | summed               | yes       |
| `ipo`   | (h - 1/(2b))^2                                 | mean over tokens     | yes       |
| `hinge` | max(0, 1 - b h)                                | summed               | yes       |
| `simpo` | -(1-e) log sigma(z) - e log sigma(-z), z = b (logp_c - logp_r) - g | mean over tokens | no |

`dpo` with e > 0 is conservative DPO (labels flipped with probability e); IPO on mean log-probabilities
and SimPO's length normalisation follow the papers (and TRL's `ipo` / `simpo`). The implicit rewards
TRL users read are `b * d_c` and `b * d_r` (SimPO: `b * logp_c`, `b * logp_r`).

`bradley_terry_loss` is the reward model's (`stage=rm`): -log sigma(r_c - r_r - margin) on the scalar
rewards of the two responses, the margin optional (Llama 2's reward models use one).

`preference_loss` divides by the GLOBAL number of pairs (all ranks, all micro-batches), like
`nll_loss` divides by the global token count, so micro-batch losses and metrics add up to the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PreferenceSettings:
    """The numbers a preference loss reads (`LearnerConfig.preference_*`)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0


def _sigmoid_loss(z: Tensor, s: PreferenceSettings) -> Tensor:
    return -(1.0 - s.label_smoothing) * F.logsigmoid(z) - s.label_smoothing * F.logsigmoid(-z)


def dpo_losses(chosen: Tensor, rejected: Tensor, s: PreferenceSettings) -> Tensor:
    """Per-pair DPO loss from the log-ratios `chosen` = d_c and `rejected` = d_r, (N,) each."""
    return _sigmoid_loss(s.beta * (chosen - rejected), s)


def ipo_losses(chosen: Tensor, rejected: Tensor, s: PreferenceSettings) -> Tensor:
    """Per-pair IPO loss: the squared distance of h from 1 / (2 beta)."""
    return (chosen - rejected - 1.0 / (2.0 * s.beta)) ** 2


def hinge_losses(chosen: Tensor, rejected: Tensor, s: PreferenceSettings) -> Tensor:
    """Per-pair hinge loss (SLiC): max(0, 1 - beta h)."""
    return torch.relu(1.0 - s.beta * (chosen - rejected))


def simpo_losses(chosen: Tensor, rejected: Tensor, s: PreferenceSettings) -> Tensor:
    """Per-pair SimPO loss from the policy's mean token log-probabilities (no reference)."""
    return _sigmoid_loss(s.beta * (chosen - rejected) - s.gamma, s)


@dataclass(frozen=True)
class PreferenceLoss:
    """One entry of `PREFERENCE_LOSSES`: the per-pair loss and what it reads."""

    losses: Callable[[Tensor, Tensor, PreferenceSettings], Tensor]
    uses_reference: bool
    """Whether d_c, d_r subtract the reference's log-probabilities (False: the policy's alone)."""
    mean_over_tokens: bool
    """Whether sequence log-probabilities are divided by the response length."""


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_losses, uses_reference=True, mean_over_tokens=False),
    "ipo": PreferenceLoss(ipo_losses, uses_reference=True, mean_over_tokens=True),
    "hinge": PreferenceLoss(hinge_losses, uses_reference=True, mean_over_tokens=False),
    "simpo": PreferenceLoss(simpo_losses, uses_reference=False, mean_over_tokens=True),
}


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probabilities of N pairs' responses: sums over response tokens and their counts, (N,) each."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def per_pair(self, mean_over_tokens: bool) -> tuple[Tensor, Tensor]:
        if not mean_over_tokens:
            return self.chosen, self.rejected
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def preference_loss(
    name: str, policy: PairLogps, reference: PairLogps | None, settings: PreferenceSettings, num_pairs: int
) -> tuple[Tensor, dict[str, float]]:
    """The loss `name` summed over these pairs and divided by the global pair count `num_pairs`, and the
    metrics TRL users read, each this call's share of a global mean (so they add over micro-batches
    and ranks): `rewards/chosen`, `rewards/rejected`, `rewards/margin`, `rewards/accuracy`,
    `logps/chosen`, `logps/rejected` (the policy's, summed or mean as the loss reads them)."""
    entry = PREFERENCE_LOSSES[name]
    if num_pairs <= 0:
        raise ValueError(f"preference_loss: num_pairs must be positive (the global pair count), got {num_pairs}")
    chosen, rejected = policy.per_pair(entry.mean_over_tokens)
    d_c, d_r = chosen, rejected
    if entry.uses_reference:
        if reference is None:
            raise ValueError(f"preference loss {name!r} needs the reference's log-probabilities")
        ref_c, ref_r = reference.per_pair(entry.mean_over_tokens)
        d_c, d_r = chosen - ref_c, rejected - ref_r
    losses = entry.losses(d_c, d_r, settings)  # (N,)
    loss = losses.sum() / num_pairs
    with torch.no_grad():
        reward_c, reward_r = settings.beta * d_c, settings.beta * d_r
        metrics = {
            "learner/loss": float(loss),
            "rewards/chosen": float(reward_c.sum()) / num_pairs,
            "rewards/rejected": float(reward_r.sum()) / num_pairs,
            "rewards/margin": float((reward_c - reward_r).sum()) / num_pairs,
            "rewards/accuracy": float((reward_c > reward_r).float().sum()) / num_pairs,
            "logps/chosen": float(chosen.sum()) / num_pairs,
            "logps/rejected": float(rejected.sum()) / num_pairs,
        }
    return loss, metrics


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, num_pairs: int, margin: Tensor | None = None,
                       ) -> tuple[Tensor, dict[str, float]]:
    """-log sigma(chosen - rejected - margin) summed over these pairs / `num_pairs`, and the metrics
    (each this call's share of a global mean): `rewards/chosen`, `rewards/rejected`, `rewards/margin`,
    `rewards/accuracy` (the share of pairs whose chosen reward is higher)."""
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - (margin if margin is not None else 0.0)).sum() / num_pairs
    with torch.no_grad():
        metrics = {"learner/loss": float(loss), "rewards/chosen": float(chosen.sum()) / num_pairs,
                   "rewards/rejected": float(rejected.sum()) / num_pairs, "rewards/margin": float(diff.sum()) / num_pairs,
                   "rewards/accuracy": float((diff > 0).float().sum()) / num_pairs}
    return loss, metrics
