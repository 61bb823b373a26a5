"""engine.collectors / engine.collector_base: collectors built from the table `rl.collector` names or
from a `module:Class` path, config choices read from the tables, the sampling seeds, and the
collector's state travelling through a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.collector_base import (
    EVAL_SEED_OFFSET,
    ROUND_SEED_STRIDE,
    RUN_SEED_STRIDE,
    Collector,
    CollectorContext,
    eval_seed,
    sample_seed,
)
from engine.collectors import COLLECTORS, TaskCollector, collector_class
from engine.config import CHOICES, AssayConfig, ConfigError, compose_config
from engine.layouts import LAYOUTS
from engine.selfplay import SelfPlayCollector
from engine.tasks import load_task_source
from rollout.types import Response, Sampling
from tests.engine.plugins import PATH, FirstTaskCollector
from verifiers import Task, Verdict

RL = ["stage=rl", "rl.prompts_per_step=2", "rollout.n=2", "learner.batch_size=4", "learner.micro_batch_size=4"]


def _context(cfg: AssayConfig, tmp_path: Path, rollout: Any = None) -> CollectorContext:
    source = load_task_source(cfg.task.source, cfg.task, cfg.seed)
    return CollectorContext(cfg, source, rollout, [], tmp_path, source.eval_tasks(cfg.task.eval_size))


class EchoRollout:
    """`generate` answers every task with its reference (or "wrong" for odd samples) from weights of
    version `version`, and records the seeds."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.seeds: list[int | None] = []

    def generate(self, tasks: list[Task], n: int, sampling: Sampling) -> list[Response]:
        self.seeds.append(sampling.seed)
        return [Response(t.id, [1], [2, 3], [-0.1, -0.2], str(t.reference) if g % 2 == 0 else "wrong", "stop", self.version)
                for t in tasks for g in range(n)]


def test_config_choices_are_the_tables() -> None:
    assert CHOICES["rl.collector"] == tuple(COLLECTORS) == ("tasks", "selfplay")
    assert CHOICES["cluster.placement"] == tuple(LAYOUTS) == ("colocated", "split")


def test_the_configured_collector_comes_from_the_table(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("engine.collector_base.score_on_actors",
                        lambda scorers, items: [Verdict(1.0 if text != "wrong" else 0.0, "") for text, _ in items])
    cfg = compose_config([*RL, "seed=3"])
    assert collector_class(cfg.rl.collector) is TaskCollector
    rollout = EchoRollout(version=5)
    collector = collector_class(cfg.rl.collector)(_context(cfg, tmp_path, rollout))
    assert isinstance(collector, Collector)
    responses, rewards, metrics = collector.collect(5)
    assert len(responses) == 4 and rewards.tolist() == [[1.0, 0.0], [1.0, 0.0]]  # (P, G): even samples right
    assert metrics["rollout/reward_mean"] == 0.5 and metrics["rollout/stale_dropped"] == 0.0
    assert rollout.seeds == [3 * 1_000_003 + 5]  # sample_seed(3, 5): run seed 3, step 5, round 0
    assert collector.state_dict() == {}
    assert collector_class("selfplay") is SelfPlayCollector


def test_a_collector_of_ones_own_by_module_class_path(tmp_path) -> None:
    cfg = compose_config([*RL, f"rl.collector={PATH}:FirstTaskCollector"])
    cls = collector_class(cfg.rl.collector)
    assert cls is FirstTaskCollector
    collector = cls(_context(cfg, tmp_path))
    responses, rewards, metrics = collector.collect(0)
    assert len(responses) == 2 and rewards.shape == (1, 2) and metrics == {"test/collected": 1.0}
    again = cls(_context(cfg, tmp_path))
    again.load_state_dict(json.loads(json.dumps(collector.state_dict())))  # as a checkpoint stores it
    assert again.collect(1)[2] == {"test/collected": 2.0}
    again.finish(tmp_path)
    assert (tmp_path / "first_task.txt").read_text() == "2"


def test_bad_collectors_are_named() -> None:
    with pytest.raises(ConfigError, match=r"rl.collector='nope' is not allowed; expected one of tasks, selfplay "
                                          r"or a 'module:Class' path"):
        compose_config(["rl.collector=nope"])
    with pytest.raises(ValueError, match=r"cannot load 'Missing' from 'tests.engine.plugins'"):
        collector_class(f"{PATH}:Missing")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        collector_class("no_such_module:Collector")
    with pytest.raises(ValueError, match=r"lacks the Collector method\(s\) state_dict, load_state_dict, finish"):
        collector_class(f"{PATH}:NotACollector")


def test_seeds_have_one_home() -> None:
    assert (RUN_SEED_STRIDE, ROUND_SEED_STRIDE, EVAL_SEED_OFFSET) == (1_000_003, 7_919_000, 7919)
    assert sample_seed(0, 0) == 0
    assert sample_seed(2, 5) == 2_000_011  # 2 x 1_000_003 + 5
    assert sample_seed(2, 5, round_=1) == 9_919_011  # + 7_919_000 for the step's second round
    assert eval_seed(3) == 7922


class _Learner:
    def save(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "weights.bin").write_bytes(b"w")

    def load(self, path: str) -> None:
        assert (Path(path) / "weights.bin").read_bytes() == b"w"


class _Source:
    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


def test_the_collector_state_goes_into_the_checkpoint_and_back(tmp_path) -> None:
    from engine.runs import SourceAt, resume, save_step

    path = save_step(tmp_path, _Learner(), SourceAt({"index": 8}, {"collected": 2}), step=2, keep=2)
    source, collector = _Source(), FirstTaskCollector(ctx=None)
    assert resume(path, _Learner(), source, collector) == 2  # type: ignore[arg-type]
    assert source.loaded == {"index": 8} and collector.collected == 2


def test_whole_minibatch_groups_keeps_the_most_groups_that_fill_minibatches() -> None:
    from engine.collector_base import whole_minibatch_groups

    assert whole_minibatch_groups(3, n=2, batch_size=4) == 2  # 6 samples -> 4
    assert whole_minibatch_groups(1, n=2, batch_size=4) == 0  # 2 samples fill none: no update
