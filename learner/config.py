"""The learner's structured config: the one place its defaults live.

Hydra composes `LearnerConfig` from these dataclass defaults plus YAML overrides; the engine converts
it to this dataclass at the entry point, so nothing downstream reads a default from anywhere else.
Only OmegaConf-supported field types are used (`X | None` is the one union; no tuples of mixed types
or callables).

The RL fields below `loss` are numbers and table keys for `learner.algos.POLICY_LOSSES`; the
supervised modes ignore them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from learner.algos import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
OLD_LOGPROBS = ("auto", "learner", "rollout")
LR_SCHEDULES = ("cosine", "constant")
HEADS = ("lm", "reward")


@dataclass
class CriticConfig:
    """PPO's value model (`learner.critic`), trained next to the policy on every learner rank."""

    enabled: bool = False
    """Build and train the critic (`algo=ppo` turns it on; `rl.advantage=gae` needs it)."""

    path: str | None = None
    """Checkpoint directory of the critic's transformer body; None: the policy's starting weights."""

    lr: float = 1e-4
    """The critic's peak learning rate (same warmup and schedule as the policy)."""

    value_clip: float | None = 0.2
    """Clipped value loss: values move at most this far from their value at scoring time unless that
    lowers the loss anyway; None: plain squared error."""


@dataclass
class LearnerConfig:
    """DeepSpeed learner settings shared by supervised (pretrain / SFT) and RL modes."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients),
    3 (+ parameters)."""

    precision: str = "fp32"
    """`fp32`, or `bf16` (bf16 weights and activations with fp32 master weights in the optimizer)."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to every parameter."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""

    eps: float = 1e-8
    """AdamW epsilon."""

    warmup_steps: int = 0
    """Optimizer steps of linear warmup: step s (0-based) uses lr * (s + 1) / warmup_steps."""

    lr_schedule: str = "cosine"
    """After warmup: `cosine` decay from lr to lr * min_lr_ratio over the remaining steps, or
    `constant`."""

    min_lr_ratio: float = 0.1
    """Floor of the cosine decay, as a fraction of lr."""

    batch_size: int = 8
    """Sequences per optimizer step, across all learner ranks (the global batch)."""

    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank. Gradient accumulation steps =
    batch_size / (micro_batch_size * world_size), which must be a positive integer."""

    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""

    seed: int = 0
    """Seed of torch's RNG on every learner rank (offset by rank)."""

    head: str = "lm"
    """What the learner trains: `lm`, the causal LM (every stage but `rm`), or `reward`, the same body with
    a scalar head (`AutoModelForSequenceClassification`, one label), which `stage=rm` sets."""

    loss: str = "nll"
    """Key into `learner.algos.LOSSES` (supervised modes: pretrain, SFT)."""

    policy_loss: str = "ppo_clip"
    """RL: key into `learner.algos.POLICY_LOSSES` (`ppo_clip`, `gspo`)."""

    clip_low: float = 0.2
    """RL: the ratio is clipped below at 1 - clip_low."""

    clip_high: float = 0.2
    """RL: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher sets it above clip_low)."""

    clip_ratio_c: float | None = None
    """RL: dual clip; a token with a negative advantage loses at most -clip_ratio_c * A. Must be > 1;
    None disables it."""

    kl_coef: float = 0.0
    """RL: weight of the in-loss KL penalty against the frozen reference model (the weights in
    model_dir). 0 skips the reference model entirely (it is neither built nor run)."""

    kl_estimator: str = "k3"
    """RL: key into `learner.algos.KL_ESTIMATORS` (`k1`, `k2`, `k3`)."""

    aggregation: str = "token-mean"
    """RL: key into `learner.algos.AGGREGATIONS`: how per-token losses become the minibatch loss."""

    norm_len: int | None = None
    """RL: the constant length of `seq-mean-token-sum-norm` (Dr.GRPO; e.g. the rollout's max new
    tokens). Required by that aggregation, unused by the others."""

    ppo_epochs: int = 1
    """RL: K, the number of sweeps over one step's batch; each sweep takes one optimizer step per
    minibatch of `batch_size` sequences, in the same order every epoch."""

    old_logprobs: str = "auto"
    """RL: where pi_old, the PPO ratio's denominator, comes from: `learner` (a forward pass of the
    current weights over the step's batch before the first update, as verl and TRL compute it),
    `rollout` (the sampler's own logprobs of its tokens, skipping that pass), or `auto`: `rollout` where
    that is exact, else `learner`. The engine resolves `auto` when it composes the config, because only
    it knows the sampler: exact means synchronous (`rl.max_staleness=0`, no `tis_cap`) with the rollout
    in the learner's precision (`rollout.dtype` float32 with `precision` fp32, bfloat16 with bf16). A
    LearnerConfig used without the engine treats `auto` as `learner`. `rollout` is exact only
    when the sampler served these very weights in the learner's precision (the synchronous loop in
    fp32: vLLM and the learner agree to ~1e-6 here); `learner/logprob_diff` is then measured on the
    first minibatch's training forward instead."""

    tis_cap: float | None = None
    """RL: truncated importance sampling: weight each token's loss by min(pi_old / pi_rollout,
    tis_cap) using the batch's `rollout_logprobs` (which then become required). None disables it."""

    kl_reward_coef: float = 0.0
    """RL: weight of KL as a reward penalty: `kl_reward_coef * (log pi_old - log pi_ref)` (k1) is
    subtracted from every response token's reward before advantages are estimated (PPO, REINFORCE++).
    The reference model is built when this or `kl_coef` is > 0."""

    critic: CriticConfig = field(default_factory=CriticConfig)
    """RL: PPO's value model (see `CriticConfig`)."""

    skip_zero_advantage: bool = True
    """RL: leave out of the forward/backward passes the rows whose advantages are 0 on every loss token
    (a GRPO group whose G rewards are all equal). Their policy-gradient term is exactly 0, so the
    gradient and every update are unchanged (the minibatch keeps its normalisers and its optimizer
    step); the token-mean metrics (`clip_frac`, `approx_kl`, `ratio_mean`, `entropy`, ...) are then
    means over the rows trained (a minibatch with none adds 0 to the mean over optimizer steps), and
    `learner/skipped_rows_frac` says how many were left out. Applied
    only where such rows add nothing to the loss: not with an in-loss KL term (`kl_coef > 0`) or a
    critic (`critic.enabled`), which train on every row."""

    entropy_metric: bool = True
    """RL: report `learner/entropy`, the token-mean policy entropy over the response tokens, from the
    first epoch's training forward passes."""

    preference_loss: str = "dpo"
    """`stage=dpo`: key into `learner.algos.PREFERENCE_LOSSES`: `dpo` (sigmoid), `ipo`, `hinge`, or the
    reference-free `simpo`. Conservative DPO is `dpo` with `preference_label_smoothing > 0`."""

    preference_beta: float = 0.1
    """`stage=dpo`: beta, the inverse temperature of the implicit reward `beta * (log pi - log pi_ref)`
    (IPO: the target margin is 1 / (2 beta); SimPO: the scale of its length-normalised reward)."""

    preference_label_smoothing: float = 0.0
    """`stage=dpo`: for `dpo` and `simpo`, the assumed probability that a pair's labels are flipped
    (conservative DPO); in [0, 0.5)."""

    simpo_gamma: float = 0.5
    """`stage=dpo` with `preference_loss=simpo`: the target reward margin gamma."""

    preference_shared_prefix: bool = True
    """`stage=dpo`: run each pair as one row -- the prompt once, then both responses, each masked from the
    other -- instead of two rows (`learner.preference_step`): the same numbers on fewer tokens. Needs an
    attention that takes a custom mask (`sdpa`, `eager`); with another the pairs run as two rows."""

    preference_nll_coef: float = 0.0
    """`stage=dpo`: weight of an extra NLL term on the chosen responses (token mean over the batch), as
    RPO and TRL's `rpo_alpha` add; 0 leaves it out."""

    threads: int = 1
    """torch intra-op threads of each learner actor. Set explicitly: a learner and a rollout actor whose
    thread pools together outnumber the cores run many times slower (docs/benchmarks.md,
    "Measurements behind the code")."""


def gradient_accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """batch_size / (micro_batch_size * world_size), or a ValueError naming the fields."""
    if batch_size <= 0 or micro_batch_size <= 0 or world_size <= 0:
        raise ValueError(
            f"LearnerConfig: batch_size ({batch_size}), micro_batch_size ({micro_batch_size}) and the "
            f"learner world_size ({world_size}) must all be positive"
        )
    per_step = micro_batch_size * world_size
    if batch_size % per_step != 0:
        raise ValueError(
            f"LearnerConfig: batch_size ({batch_size}) must be a multiple of micro_batch_size "
            f"({micro_batch_size}) x learner world_size ({world_size}) = {per_step}, so that gradient "
            f"accumulation steps = batch_size / (micro_batch_size x world_size) is a positive integer"
        )
    return batch_size // per_step


def skips_zero_advantage(cfg: LearnerConfig) -> bool:
    """Whether an RL step leaves zero-advantage rows out (`LearnerConfig.skip_zero_advantage`)."""
    return cfg.skip_zero_advantage and cfg.kl_coef == 0 and not cfg.critic.enabled


def validate(cfg: LearnerConfig, world_size: int) -> int:
    """Check the choices in `cfg`; return the gradient accumulation steps for `world_size` ranks."""
    if cfg.zero_stage not in ZERO_STAGES:
        raise ValueError(f"LearnerConfig.zero_stage: expected one of {ZERO_STAGES}, got {cfg.zero_stage!r}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"LearnerConfig.precision: expected one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"LearnerConfig.lr_schedule: expected one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}"
        )
    if len(cfg.betas) != 2:
        raise ValueError(f"LearnerConfig.betas: expected two numbers [beta1, beta2], got {list(cfg.betas)!r}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"LearnerConfig.min_lr_ratio: expected a value in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"LearnerConfig.warmup_steps: expected >= 0, got {cfg.warmup_steps}")
    if cfg.threads < 1:
        raise ValueError(f"LearnerConfig.threads: expected a positive integer, got {cfg.threads}")
    if cfg.head not in HEADS:
        raise ValueError(f"LearnerConfig.head: expected one of {HEADS}, got {cfg.head!r}")
    validate_rl(cfg)
    validate_preference(cfg)
    return gradient_accumulation_steps(cfg.batch_size, cfg.micro_batch_size, world_size)


def _check_key(field_name: str, value: str, table: Collection[str], table_name: str) -> None:
    if value not in table:
        raise ValueError(
            f"LearnerConfig.{field_name}: {value!r} is not in learner.algos.{table_name} {sorted(table)}"
        )


def validate_rl(cfg: LearnerConfig) -> None:
    """Check the RL fields of `cfg` (table keys and number ranges), naming the field on error."""
    _check_key("policy_loss", cfg.policy_loss, POLICY_LOSSES, "POLICY_LOSSES")
    _check_key("kl_estimator", cfg.kl_estimator, KL_ESTIMATORS, "KL_ESTIMATORS")
    _check_key("aggregation", cfg.aggregation, AGGREGATIONS, "AGGREGATIONS")
    if cfg.clip_low < 0 or cfg.clip_high < 0:
        raise ValueError(
            f"LearnerConfig.clip_low / clip_high: expected >= 0, got {cfg.clip_low} / {cfg.clip_high}"
        )
    if cfg.clip_ratio_c is not None and cfg.clip_ratio_c <= 1.0:
        raise ValueError(
            f"LearnerConfig.clip_ratio_c: expected > 1 (dual clip) or None, got {cfg.clip_ratio_c}"
        )
    if cfg.kl_coef < 0 or cfg.kl_reward_coef < 0:
        raise ValueError(f"LearnerConfig.kl_coef / kl_reward_coef: expected >= 0, got {cfg.kl_coef} / {cfg.kl_reward_coef}")
    if cfg.critic.lr <= 0 or (cfg.critic.value_clip is not None and cfg.critic.value_clip <= 0):
        raise ValueError(f"LearnerConfig.critic: lr and value_clip must be positive (value_clip may be None), "
                         f"got {cfg.critic.lr} / {cfg.critic.value_clip}")
    if cfg.norm_len is not None and cfg.norm_len <= 0:
        raise ValueError(
            f"LearnerConfig.norm_len: expected a positive token count or None, got {cfg.norm_len}"
        )
    if cfg.aggregation == "seq-mean-token-sum-norm" and cfg.norm_len is None:
        raise ValueError(
            "LearnerConfig.norm_len: aggregation 'seq-mean-token-sum-norm' needs a constant norm_len "
            "(e.g. the rollout's max new tokens), got None"
        )
    if cfg.ppo_epochs < 1:
        raise ValueError(f"LearnerConfig.ppo_epochs: expected >= 1, got {cfg.ppo_epochs}")
    if cfg.tis_cap is not None and cfg.tis_cap <= 0:
        raise ValueError(f"LearnerConfig.tis_cap: expected a positive cap or None, got {cfg.tis_cap}")
    if cfg.old_logprobs not in OLD_LOGPROBS:
        raise ValueError(f"LearnerConfig.old_logprobs: expected one of {OLD_LOGPROBS}, got {cfg.old_logprobs!r}")


def validate_preference(cfg: LearnerConfig) -> None:
    """Check the preference fields of `cfg`, naming the field on error."""
    _check_key("preference_loss", cfg.preference_loss, PREFERENCE_LOSSES, "PREFERENCE_LOSSES")
    if not cfg.preference_beta > 0:
        raise ValueError(f"LearnerConfig.preference_beta: expected > 0, got {cfg.preference_beta}")
    if not 0.0 <= cfg.preference_label_smoothing < 0.5:
        raise ValueError("LearnerConfig.preference_label_smoothing: expected a probability in [0, 0.5), got "
                         f"{cfg.preference_label_smoothing}")
    if cfg.preference_nll_coef < 0:
        raise ValueError(f"LearnerConfig.preference_nll_coef: expected >= 0, got {cfg.preference_nll_coef}")
