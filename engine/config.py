"""The whole configuration of a run: one structured dataclass per part, composed by Hydra.

Each part owns its dataclass and the only copy of its defaults (`ModelConfig` in
`engine.models`, `TaskConfig` in `engine.tasks`, `LearnerConfig` in `learner.config`,
`VerifierConfig` in `verifiers.config`, `RolloutConfig` in `rollout.config`); this module adds the engine's own (`ClusterConfig`,
`AssayConfig`), registers the schema in Hydra's ConfigStore and turns command-line overrides into
a validated `AssayConfig`. YAML under `configs/` holds only choices and experiment overrides.

Hydra's overrides need mutable config nodes, so the dataclasses are not declared frozen; the
entry point converts the composed config to plain dataclass instances once (`compose_config`) and
nothing downstream mutates or calls `cfg.get("x", default)`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.collectors import COLLECTORS
from engine.layouts import LAYOUTS
from engine.models import ModelConfig
from engine.tasks import TaskConfig
from learner.algos import ESTIMATORS, LOSSES
from learner.config import LearnerConfig
from learner.config import validate as validate_learner
from rollout.config import RolloutConfig
from verifiers.config import VerifierConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key and what is allowed."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """`None`: start a local Ray instance bound to 127.0.0.1; `auto` or `HOST:PORT`: join a running cluster."""
    learners: int = 1
    """Number of learner actors (data-parallel DeepSpeed ranks)."""
    num_cpus: int | None = None
    """CPUs for a local Ray instance (`None`: all of this machine's)."""
    placement: str = "colocated"
    """Where the RL stage's actors go (`engine.placement`): `colocated` (learners and rollout actors
    packed on one node, sharing its devices) or `split` (learners on one node, rollout on another)."""
    placement_timeout_s: float = 120.0
    """Seconds the RL stage waits for Ray to reserve its placement group before failing with what it
    asked for and which nodes there are (raise it when an autoscaler has to add nodes)."""


@dataclass
class RLConfig:
    advantage: str = "grpo"
    """Key of `learner.algos.ESTIMATORS`: `grpo` (mean/std over the G samples), `dr_grpo` (mean only),
    `rloo`, `reinforce_pp`, `reinforce_pp_baseline`, or `gae` (PPO: needs `learner.critic.enabled`)."""
    gamma: float = 1.0
    """GAE discount over response tokens (`rl.advantage=gae`)."""
    lam: float = 0.95
    """GAE lambda (`rl.advantage=gae`): 1 is the Monte-Carlo return minus the value, 0 one-step TD."""
    prompts_per_step: int = 16
    """Prompts P per RL step; each is sampled `rollout.n` (G) times, so a step trains on P×G responses."""
    verifier_actors: int = 1
    """Ray actors holding a verifier pool each (`verifier.workers` processes per actor)."""
    dynamic_sampling: bool = False
    """DAPO: keep only groups whose G rewards are not all equal, drawing more prompts (up to
    `max_sample_rounds` generation rounds) until `prompts_per_step` groups are kept."""
    max_sample_rounds: int = 3
    """With `dynamic_sampling`: most generation rounds per step, the first included. A step that
    cannot fill its batch trains on the largest multiple of `learner.batch_size` it has (or skips the
    update when that is none) and says so."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: over the last N tokens before `rollout.max_tokens` the reward
    falls linearly by up to `overlong_penalty` (0: off)."""
    overlong_penalty: float = 1.0
    """The penalty at `rollout.max_tokens` (see `overlong_buffer`)."""
    collector: str = "tasks"
    """What a step trains on (`engine.collectors.COLLECTORS`): `tasks` (groups of G responses to tasks from
    the task source), `selfplay` (the policy proposes tasks and solves them, `engine.selfplay`), or a
    `module:Class` path to a collector of one's own (`engine.collector_base.Collector`)."""
    max_staleness: int = 0
    """Async rollout: the rollout of step j may run while the learner still trains up to `max_staleness`
    earlier steps, so samples come from weights at most that many versions old (0: synchronous,
    on-policy). Above 0 it needs `learner.tis_cap`, which corrects the off-policy samples; older samples
    are dropped."""
    mask_truncated: bool = False
    """Leave responses cut at `rollout.max_tokens` out of the loss and the group statistics."""


@dataclass
class SelfPlayConfig:
    """The proposer-solver collector (`rl.collector=selfplay`, `engine.selfplay`)."""

    proposer_prompts: int = 2
    """Proposer prompts per RL step, each sampled `rollout.n` times (one proposer group each); the other
    `rl.prompts_per_step - proposer_prompts` groups of the step are solver groups."""
    examples: int = 2
    """Buffer tasks a proposer prompt shows (the SFT demonstrations of `engine.selfplay:SelfPlaySource` show 1-2)."""
    invalid_reward: float = -1.0
    """Proposer reward of an invalid proposal (a valid one gets its learnability, in [0, 1))."""
    seed_tasks: int = 16
    """Deduction tasks of `task.source` the buffer starts with, so the first proposer prompts have examples."""
    buffer_size: int = 512
    """Most tasks the buffer keeps (the oldest go first)."""
    near_duplicate: float = 0.9
    """A proposal whose token-trigram set (normalised program and input) has a Jaccard similarity at
    least this high with a buffer task's is a near-duplicate (1.0: exact duplicates only)."""
    max_output_chars: int = 100
    """Longest `repr` of a proposal's output."""
    timeout_s: float = 2.0
    """Wall-clock limit of one sandbox run of the proposals' validation calls."""
    contamination_n: int = 20
    """Drop a new task whose prompt shares an n-gram this many word tokens long with an eval prompt
    (`engine.contamination`). Not GPT-3's 13: a deduction prompt is ~30 tokens, ~10 of them template,
    and 13 flagged 123 of 200 code_reasoning training tasks against 64 held-out ones (20: 7, each a
    held-out program with one token changed; 30: none)."""


@dataclass
class AssayConfig:
    name: str = "default"
    """Experiment name; the run writes `runs_dir/<name>/<stage>/`."""
    stage: str = "pretrain"
    """`pretrain` (NLL on all tokens of packed sequences), `sft` (NLL on response tokens only), `dpo`
    (a preference loss on chosen/rejected pairs, `learner.preference_loss`), `rm` (a reward model on the
    same pairs: the Bradley-Terry loss on a scalar head) or `rl`."""
    stage_dir: str | None = None
    """The stage's directory under `runs_dir/<name>/` (default: the stage's name). Set it to run two
    stages of one kind in one run, e.g. SFT on clean demonstrations, then on a flawed teacher's."""
    init_from: str | None = None
    """With no `model.path`: the stage directory of this run whose export this stage starts from
    (default: the newest of the earlier stages, `init_from_previous_stage` says which)."""
    steps: int = 100
    """Optimizer steps of this stage."""
    seq_len: int = 64
    """Pretraining: tokens per packed row."""
    max_len: int = 64
    """SFT: longest prompt+response in tokens; longer examples are truncated from the right."""
    corpus_docs: int = 4000
    """Documents of the task corpus used to train the tiny model's tokenizer."""
    init_from_previous_stage: bool = True
    """With no `model.path`, start from this run's newest earlier-stage export (`<name>/<stage>/final/hf`):
    SFT from pretrain, DPO from SFT (else pretrain), RL from DPO, else SFT, else pretrain."""
    log_every: int = 1
    """Write metrics every N steps."""
    eval_every: int = 0
    """Run the held-out greedy evaluation every N steps (0: only at the end)."""
    stop_at_accuracy: float = 0.0
    """Supervised stages: end early (and export) once the held-out greedy accuracy of an evaluation
    (`eval_every`) reaches this fraction; 0 never stops early. Loss plateaus of small models break at
    unpredictable steps, so a threshold is steadier than a step count."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (the final export is always kept)."""
    resume: bool = False
    """Continue from the latest complete checkpoint of this run's stage (an error when the stage directory
    holds files but no loadable checkpoint; a finished stage is left as it is)."""
    overwrite: bool = False
    """Start the stage afresh even though its directory holds an earlier run, which is moved aside to
    `<stage>.old-<time>` (never deleted). Without it such a directory is refused."""
    runs_dir: str = "runs"
    """Where run directories are created."""
    seed: int = 0
    """Seed of the run (task sampling, model init and the learner)."""
    progress: bool = True
    """Show a progress bar on the console."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    selfplay: SelfPlayConfig = field(default_factory=SelfPlayConfig)


# Closed sets of values; the message of a bad value lists them.
CHOICES: dict[str, tuple[Any, ...]] = {
    "stage": ("pretrain", "sft", "dpo", "rm", "rl"),
    "rl.advantage": tuple(ESTIMATORS),
    "rl.collector": tuple(COLLECTORS),
    "learner.loss": tuple(LOSSES),
    "cluster.placement": tuple(LAYOUTS),
}
# Choices that also take a `module:Class` path to a user's plug-in (checked when the stage loads it).
PLUGIN_PATHS = ("rl.collector",)
# Fields that must be positive integers.
POSITIVE = ("steps", "seq_len", "max_len", "corpus_docs", "log_every", "keep_checkpoints", "cluster.learners",
            "rl.prompts_per_step", "rl.verifier_actors", "rl.max_sample_rounds", "learner.batch_size", "learner.micro_batch_size",
            "verifier.workers")
# Fields that must be integers >= 0 (0 means "off" or "only at the end").
NON_NEGATIVE = ("save_every", "eval_every", "verifier.max_tasks_per_worker")


def register_configs() -> None:
    ConfigStore.instance().store(name="assay_schema", node=AssayConfig)


def compose_config(overrides: list[str], config_dir: Path = CONFIG_DIR) -> AssayConfig:
    """Compose `configs/config.yaml` with command-line `overrides` into a validated `AssayConfig`."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            composed = compose(config_name="config", overrides=overrides)
    except OverrideParseException as err:  # a malformed `key=value`: name it and what the parser wanted
        lines = str(err).strip().splitlines()
        raise ConfigError(f"invalid configuration: {' - '.join(lines[:2])}\n  (Hydra override syntax: key=value)") from None
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides, config_dir)) from None
    try:
        cfg = OmegaConf.to_object(composed)  # runs each dataclass's own __post_init__ checks
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, overrides, config_dir)) from None
    except ValueError as err:
        raise ConfigError(f"invalid configuration: {err}") from None
    assert isinstance(cfg, AssayConfig)
    validate(cfg)
    return cfg


def validate(cfg: AssayConfig) -> None:
    """Check values that types alone cannot: closed choices and positive counts."""
    for key, allowed in CHOICES.items():
        value = _lookup(cfg, key)
        if value not in allowed and not (key in PLUGIN_PATHS and ":" in value):
            raise ConfigError(f"{key}={value!r} is not allowed; expected one of {', '.join(map(str, allowed))}"
                              + (" or a 'module:Class' path" if key in PLUGIN_PATHS else ""))
    for key in POSITIVE:
        value = _lookup(cfg, key)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key}={value!r} is not allowed; expected a positive integer")
    for key in NON_NEGATIVE:
        value = _lookup(cfg, key)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}={value!r} is not allowed; expected an integer >= 0 (0: off)")
    if not 0.0 <= cfg.verifier.max_infra_error_frac <= 1.0:
        raise ConfigError(f"verifier.max_infra_error_frac={cfg.verifier.max_infra_error_frac!r} is not allowed; "
                          "expected a fraction in [0, 1] (1: never stop)")
    if not cfg.verifier.timeout_s > 0:
        raise ConfigError(f"verifier.timeout_s={cfg.verifier.timeout_s!r} is not allowed; expected seconds > 0")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true and overwrite=true contradict each other: resume continues the stage's "
                          "run, overwrite moves it aside and starts afresh; pass one")
    rl_batch = cfg.rl.prompts_per_step * cfg.rollout.n
    if cfg.stage == "rl" and rl_batch % cfg.learner.batch_size:
        raise ConfigError(f"rl.prompts_per_step × rollout.n = {cfg.rl.prompts_per_step} × {cfg.rollout.n} = {rl_batch} "
                          f"sequences per RL step must be a multiple of learner.batch_size ({cfg.learner.batch_size})")
    if not 0 <= cfg.rl.overlong_buffer <= cfg.rollout.max_tokens:
        raise ConfigError(f"rl.overlong_buffer={cfg.rl.overlong_buffer} is not allowed; expected 0 (off) up to "
                          f"rollout.max_tokens ({cfg.rollout.max_tokens})")
    if (cfg.rl.advantage == "gae") != cfg.learner.critic.enabled:
        raise ConfigError(f"rl.advantage={cfg.rl.advantage} with learner.critic.enabled={cfg.learner.critic.enabled}: "
                          "GAE needs the critic's values and the critic trains only on GAE returns; use algo=ppo, "
                          "or set both (rl.advantage=gae learner.critic.enabled=true) or neither")
    if cfg.rl.max_staleness < 0 or (cfg.rl.max_staleness > 0 and cfg.learner.tis_cap is None):
        raise ConfigError(f"rl.max_staleness={cfg.rl.max_staleness}: expected 0 (synchronous) or a positive number "
                          "of versions together with learner.tis_cap (e.g. 2.0), which importance-corrects the "
                          "samples of older weights")
    if cfg.stage == "rm":  # the stage decides what the learner trains (resolved here, like old_logprobs)
        cfg.learner.head = "reward"
    elif cfg.learner.head != "lm":
        raise ConfigError(f"learner.head={cfg.learner.head} is for stage=rm only (stage={cfg.stage} trains the causal LM)")
    if cfg.learner.old_logprobs == "auto":  # resolved here, the one place that sees sampler and learner
        cfg.learner.old_logprobs = "rollout" if sampler_logprobs_exact(cfg) else "learner"
    if cfg.learner.old_logprobs == "rollout" and (cfg.rl.max_staleness > 0 or cfg.learner.tis_cap is not None):
        raise ConfigError("learner.old_logprobs=rollout takes pi_old from the sampler, which is right only for "
                          "on-policy samples: not with rl.max_staleness > 0 or learner.tis_cap (which corrects "
                          "the sampler against pi_old); use learner.old_logprobs=learner there")
    if not (0.0 <= cfg.rl.gamma <= 1.0 and 0.0 <= cfg.rl.lam <= 1.0):
        raise ConfigError(f"rl.gamma={cfg.rl.gamma} / rl.lam={cfg.rl.lam}: expected values in [0, 1]")
    try:
        validate_learner(cfg.learner, cfg.cluster.learners)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# learner.precision -> the rollout.dtype that samples in the same precision
SAME_PRECISION = {"fp32": "float32", "bf16": "bfloat16"}


def sampler_logprobs_exact(cfg: AssayConfig) -> bool:
    """True when the rollout's logprobs are pi_old itself: synchronous (each step samples from the weights
    it trains), no importance correction, and the sampler computing in the learner's precision."""
    return (cfg.rl.max_staleness == 0 and cfg.learner.tis_cap is None
            and SAME_PRECISION.get(cfg.learner.precision) == cfg.rollout.dtype)


def to_yaml(cfg: AssayConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _known_keys(node: Any = AssayConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        keys.extend(_known_keys(type(default), key + ".") if is_dataclass(default) else [key])
    return keys


def _explain(err: Exception, overrides: list[str], config_dir: Path) -> str:
    """Turn Hydra/OmegaConf's error into one that names the key, the value and what is allowed."""
    cause = err.__cause__ or err
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    key = getattr(cause, "full_key", None) or _override_key(text, overrides)
    lines = [f"invalid configuration: {key + ': ' if key and key not in text else ''}{text}"]
    known = _known_keys()
    if "Could not find" in text or isinstance(err, MissingConfigException):
        for group in sorted(p.name for p in config_dir.iterdir() if p.is_dir()):
            options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
            lines.append(f"  {group}=  one of: {', '.join(options)}")
    elif key and key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        siblings = [k for k in known if k.startswith(parent) and k.count(".") == key.count(".")]
        lines.append(f"  did you mean: {', '.join(close)}?" if close else f"  keys allowed here: {', '.join(siblings)}")
    lines.append(f"  (overrides given: {' '.join(overrides) or 'none'})")
    return "\n".join(lines)


def _override_key(text: str, overrides: list[str]) -> str | None:
    """The key of the override that the error message is about, when the message does not name it."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in text or (value and f"'{value}'" in text):
            return key
    return None
