"""`VerifierConfig`: the `verifier:` group of the Hydra config, the one place its defaults live.

Plain types only (OmegaConf structured config). Not declared frozen: Hydra's command-line overrides
need mutable config nodes. The engine converts the composed config to this dataclass at the entry
point and builds either a `VerifierPool` (local processes) or, when `endpoint` is set, a
`RemoteVerifierPool` (a gRPC verifier service started with `assay serve-verifiers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardComponent:
    """One term of the RL reward (`VerifierConfig.rewards`)."""

    verifier: str = "task"
    """A verifier's name (or `module:Class`), or `task`: the verifier each task names."""

    weight: float = 1.0
    """The term's weight in the sum."""


@dataclass
class VerifierConfig:
    workers: int = 2
    """Process workers in the local pool (each builds its verifiers once and reuses them)."""

    timeout_s: float = 10.0
    """Hard wall-clock limit per verification; past it the worker is killed and replaced, and the item
    is a `timeout` infra error (score None: left out of the loss, counted, never a 0)."""

    endpoint: str | None = None
    """`HOST:PORT` of a gRPC verifier service; when set, scoring goes there instead of a local pool."""

    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Constructor options per verifier name, e.g. `{"unit_tests": {"memory_mb": 1024}}`."""

    max_tasks_per_worker: int = 0
    """Replace a worker after this many verifications (bounds slow leaks); 0 = never."""

    build_timeout_s: float = 120.0
    """Limit on building one verifier in one worker (imports, warm-up); not counted in `timeout_s`."""

    call_timeout_s: float | None = None
    """Deadline of one batched gRPC call; None = `timeout_s * items + 30` (the serial worst case)."""

    rewards: list[RewardComponent] = field(default_factory=list)
    """RL: the training reward as a weighted sum of verifiers' scores of each response, e.g.
    `[{verifier: task, weight: 1.0}, {verifier: reward_model, weight: 0.2}]` (the task's own verifier plus
    0.2 x a reward model's normalised score); each term is logged as `reward/<verifier>`. A response one
    term cannot judge has no reward (left out, as any infra error). A weight-0 term is only logged: the
    gold judge to watch while training against a reward model (its score falling while the reward
    model's rises is reward over-optimisation). Empty: the task's verifier alone. Held-out evaluation
    always uses the task's verifier."""

    max_infra_error_frac: float = 0.5
    """Stop the run when more than this share of one RL step's verifications are infra errors (the
    verifier raised, timed out, crashed, could not be built, or returned a non-finite or out-of-range
    score): past it the rewards say more about the verifier than the policy. 1.0 never stops."""
