"""Config composition: defaults from the dataclasses, YAML choices, overrides, and clear errors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.config import AssayConfig, ConfigError, compose_config, to_yaml
from learner.config import LearnerConfig


def test_defaults_come_from_the_dataclasses() -> None:
    cfg = compose_config([])
    assert isinstance(cfg, AssayConfig)
    # the default recipe (configs/algo/grpo.yaml) states nothing: the CLI trains what LearnerConfig() says,
    # with `auto` resolved (synchronous, fp32 learner and float32 rollout: the sampler's logprobs are exact)
    assert LearnerConfig().old_logprobs == "auto"
    assert cfg.learner == replace(LearnerConfig(), old_logprobs="rollout")
    assert cfg.rl.advantage == "grpo"
    assert cfg.model.path is None and cfg.cluster.address is None


def test_experiment_and_overrides_compose() -> None:
    cfg = compose_config(["experiment=arith_tiny", "learner.lr=1e-3", "cluster.learners=2", "stage=sft"])
    assert cfg.name == "arith_tiny"
    assert cfg.learner.lr == pytest.approx(1e-3)
    assert cfg.cluster.learners == 2
    assert cfg.stage == "sft"
    assert cfg.task.arithmetic.digits == 2  # arith_tiny: 2-digit addition


def test_every_part_can_be_overridden() -> None:
    cfg = compose_config(["verifier.workers=4", "verifier.endpoint=127.0.0.1:50051", "model.hidden_size=128",
                          "task.arithmetic.digits=3", "learner.zero_stage=3", "cluster.num_cpus=2"])
    assert (cfg.verifier.workers, cfg.verifier.endpoint) == (4, "127.0.0.1:50051")
    assert (cfg.model.hidden_size, cfg.task.arithmetic.digits) == (128, 3)
    assert (cfg.learner.zero_stage, cfg.cluster.num_cpus) == (3, 2)


def test_algo_choice_sets_a_recipe() -> None:
    cfg = compose_config(["algo=dr_grpo", "rollout.max_tokens=24"])
    assert (cfg.rl.advantage, cfg.learner.aggregation, cfg.learner.kl_coef) == ("dr_grpo", "seq-mean-token-sum-norm", 0.0)
    assert cfg.learner.norm_len == 24  # interpolated from rollout.max_tokens


def test_rl_batch_must_fill_minibatches() -> None:
    with pytest.raises(ConfigError, match="multiple of learner.batch_size"):
        compose_config(["stage=rl", "rl.prompts_per_step=3", "rollout.n=4", "learner.batch_size=8",
                        "learner.micro_batch_size=8"])


def test_group_choice_sets_fields() -> None:
    assert compose_config(["cluster=ray"]).cluster.address == "auto"
    assert compose_config(["rollout=hf"]).rollout.backend == "hf"
    assert compose_config(["model=local", "model.path=/models/x"]).model.path == "/models/x"


def test_misspelled_key_names_key_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["learner.lrr=1e-3"])
    message = str(err.value)
    assert "lrr" in message and "learner.lr" in message


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["stepz=3"])
    assert "stepz" in str(err.value) and "steps" in str(err.value)


def test_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["learner.zero_stage=abc"])
    assert "zero_stage" in str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stage=rl2", "stage='rl2' is not allowed; expected one of pretrain, sft, dpo, rm, rl"),
        ("learner.zero_stage=5", "zero_stage"),
        ("learner.precision=fp8", "fp32"),
        ("steps=0", "steps=0 is not allowed; expected a positive integer"),
        ("cluster.placement=spread", "colocated, split"),
        ("rollout.num_workers=0", "rollout.num_workers must be a positive integer"),
        ("rollout.backend=sglang", "rollout.backend"),
        ("rl.overlong_buffer=99", "rl.overlong_buffer=99 is not allowed; expected 0 (off) up to rollout.max_tokens"),
        ("rl.max_sample_rounds=0", "rl.max_sample_rounds=0 is not allowed; expected a positive integer"),
        ("learner.threads=0", "LearnerConfig.threads: expected a positive integer"),
        ("rollout.threads=0", "rollout.threads must be a positive integer"),
        ("task.arithmetic.answer_format=roman", "answer_format='roman'"),
    ],
)
def test_invalid_values_name_what_is_allowed(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert expected in str(err.value)


def test_unknown_group_option_lists_options() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["experiment=nope"])
    assert "arith_tiny" in str(err.value)


def test_batch_must_split_over_learners() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["learner.batch_size=6", "learner.micro_batch_size=4", "cluster.learners=2"])
    assert "batch_size" in str(err.value) and "micro_batch_size" in str(err.value)


def test_yaml_round_trip_names_every_part() -> None:
    text = to_yaml(compose_config(["experiment=arith_tiny"]))
    for part in ("model:", "task:", "learner:", "verifier:", "rollout:", "cluster:", "name: arith_tiny"):
        assert part in text


def test_a_malformed_override_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"Error parsing override 'rollout.n==' - extraneous input '='"):
        compose_config(["rollout.n=="])


@pytest.mark.parametrize(("overrides", "expected"), [
    ((), "rollout"),
    (("rl.max_staleness=1", "learner.tis_cap=2.0"), "learner"),  # off-policy samples: pi_old is the learner's
    (("learner.tis_cap=2.0",), "learner"),  # importance correction compares the sampler against pi_old
    (("rollout.dtype=bfloat16",), "learner"),  # another precision than the fp32 learner
    (("rollout.dtype=bfloat16", "learner.precision=bf16"), "rollout"),
    (("learner.old_logprobs=learner",), "learner"),  # an explicit choice is kept
])
def test_old_logprobs_auto_takes_the_samplers_only_where_they_are_exact(overrides, expected) -> None:
    assert compose_config(["stage=rl", *overrides]).learner.old_logprobs == expected


def test_recipes_state_only_what_differs_from_the_defaults() -> None:
    """Every key an algo file sets differs from the dataclass default (or interpolates)."""
    import yaml

    from engine.config import CONFIG_DIR

    defaults = compose_config(["stage=rl"])
    for path in sorted((CONFIG_DIR / "algo").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for section, values in data.items():
            for key, value in values.items():
                default = getattr(getattr(defaults, section), key)
                if isinstance(value, dict):
                    assert all(getattr(default, k) != v for k, v in value.items()), (path.name, key)
                elif not (isinstance(value, str) and value.startswith("${")):
                    assert value != default, f"{path.name}: {section}.{key}={value} restates the default"

