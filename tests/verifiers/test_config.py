"""verifiers.config: `VerifierConfig` works as a Hydra structured config (OmegaConf)."""

from __future__ import annotations

from omegaconf import OmegaConf

from verifiers.config import VerifierConfig


def test_structured_config_merges_overrides_and_converts_back() -> None:
    schema = OmegaConf.structured(VerifierConfig)
    merged = OmegaConf.merge(
        schema, {"workers": 4, "endpoint": "127.0.0.1:50051", "options": {"unit_tests": {"memory_mb": 1024}}}
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, VerifierConfig)
    assert (cfg.workers, cfg.timeout_s, cfg.endpoint) == (4, 10.0, "127.0.0.1:50051")
    assert cfg.options == {"unit_tests": {"memory_mb": 1024}}


def test_defaults() -> None:
    cfg = VerifierConfig()
    assert (cfg.workers, cfg.timeout_s, cfg.endpoint, cfg.options, cfg.max_tasks_per_worker) == (2, 10.0, None, {}, 0)
