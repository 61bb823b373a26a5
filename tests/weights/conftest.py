"""The weights tests that serve through a real `RolloutGroup` use the rollout tests' tiny checkpoint."""

from __future__ import annotations

from tests.rollout.conftest import model_dir  # noqa: F401 -- a session fixture, shared
