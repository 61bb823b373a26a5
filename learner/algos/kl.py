"""Per-token estimators of KL(pi || pi_ref), the penalty that keeps the policy near a frozen reference.

From John Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html).
Direction: the tokens were sampled from the policy pi (q in the post) and we estimate
KL(pi || pi_ref) = E_pi[log pi - log pi_ref]. With the post's ratio r = pi_ref / pi, i.e.
`log_r = ref_logprobs - logprobs`:

- k1 = -log r                      unbiased, high variance, negative on some tokens;
- k2 = (log r)^2 / 2               biased (low for small divergences), low variance, >= 0;
- k3 = (r - 1) - log r             unbiased and >= 0 (log x <= x - 1), low variance; GRPO's
                                   choice (Shao et al. 2024, https://arxiv.org/abs/2402.03300, eq. 4).

As loss terms (GRPO adds `kl_coef * k` to the per-token loss), each is differentiated through
`logprobs` only; `ref_logprobs` come from the frozen reference model and carry no gradient.

Departure: k3 clamps log r to [-K3_MAX_LOG_RATIO, K3_MAX_LOG_RATIO] before the exponential, so a token
the reference finds far likelier than the policy cannot overflow exp() to inf (verl clamps the same
way). Inside the clamp the value is exact.

`KL_ESTIMATORS` is the plain-dict table the config picks from; every entry is
`fn(logprobs (B, T), ref_logprobs (B, T)) -> (B, T)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

K3_MAX_LOG_RATIO = 20.0

KLFn = Callable[[Tensor, Tensor], Tensor]


def _log_ratio(logprobs: Tensor, ref_logprobs: Tensor, name: str) -> Tensor:
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"{name}: logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must match"
        )
    return ref_logprobs.detach() - logprobs  # (B, T) log r = log pi_ref - log pi


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = -log r = logprobs - ref_logprobs, per token."""
    return -_log_ratio(logprobs, ref_logprobs, "kl_k1")


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2, per token."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs, "kl_k2").square()


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(log r) - 1 - log r, per token, with log r clamped to +-K3_MAX_LOG_RATIO."""
    log_r = _log_ratio(logprobs, ref_logprobs, "kl_k3").clamp(-K3_MAX_LOG_RATIO, K3_MAX_LOG_RATIO)
    return torch.expm1(log_r) - log_r  # (B, T)


KL_ESTIMATORS: dict[str, KLFn] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
