"""`RolloutConfig`: defaults, field validation (also through OmegaConf), the Sampling it yields."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rollout.config import RolloutConfig
from rollout.worker import sampling_from_config


def test_defaults_are_the_cpu_choices():
    cfg = RolloutConfig()
    assert (cfg.backend, cfg.dtype, cfg.weight_sync) == ("vllm", "float32", "shm")
    assert OmegaConf.to_object(OmegaConf.structured(RolloutConfig)) == cfg


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "tgi"}, r"rollout.backend='tgi' is not one of \('vllm', 'hf'\)"),
        ({"dtype": "int8"}, r"rollout.dtype='int8' is not one of"),
        ({"weight_sync": "nfs"}, r"rollout.weight_sync='nfs' is not one of"),
        ({"cpu_linear": "mkl"}, r"rollout.cpu_linear='mkl' is not one of \('auto', 'onednn', 'torch'\)"),
        ({"weight_notify": "zmq"}, r"rollout.weight_notify='zmq' is not one of \('socket', 'ray'\)"),
        ({"n": 0}, r"rollout.n must be a positive integer, got 0"),
        ({"temperature": -0.5}, r"rollout.temperature must be >= 0"),
        ({"top_p": 0.0}, r"rollout.top_p must be in \(0, 1\]"),
        ({"kv_cache_gib": 0}, r"rollout.kv_cache_gib must be positive"),
    ],
)
def test_invalid_fields_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(**changes)
    merged = OmegaConf.merge(OmegaConf.structured(RolloutConfig), changes)
    with pytest.raises(ValueError, match=message):
        OmegaConf.to_object(merged)


def test_sampling_from_config_copies_the_defaults_and_overrides_the_seed():
    cfg = RolloutConfig(temperature=0.7, top_p=0.9, max_tokens=12, stop=["\n"], seed=5)
    s = sampling_from_config(cfg)
    assert (s.temperature, s.top_p, s.max_tokens, s.stop, s.seed) == (0.7, 0.9, 12, ["\n"], 5)
    assert sampling_from_config(cfg, seed=99).seed == 99
