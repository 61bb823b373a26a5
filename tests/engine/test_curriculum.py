"""The adaptive curriculum (`engine.tasks.curriculum`): the level follows hand-built solve rates, the
metrics by hand, exact resume, held-out disjointness across levels, config errors, and a 2-step RL run
through the real loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.tasks import Task, TaskSource, load_task_source
from engine.tasks.arithmetic import ArithmeticSource
from engine.tasks.curriculum import CurriculumSource, group_solve_rates, moving_rate, next_level

NAN = float("nan")


def _curriculum(seed: int = 0, **knobs) -> CurriculumSource:
    """Three arithmetic levels: 1, 2 and 3 digits."""
    levels = [ArithmeticSource(digits=d, seed=seed * 3 + d, eval_size=8) for d in (1, 2, 3)]
    return CurriculumSource(levels, seed=seed, eval_size=8, **knobs)


def _rewards(groups: int, solved: int, g: int = 4) -> torch.Tensor:
    """`groups` groups of `g` samples, the first `solved` of each group right."""
    return torch.tensor([[1.0] * solved + [0.0] * (g - solved)] * groups)  # (P, G)


def _task(level: int) -> Task:
    return Task(id=f"t{level}", prompt="?", reference="0", verifier="math", meta={"level": level})


def test_the_level_moves_up_when_solve_rates_are_high_and_down_when_low():
    source = _curriculum(explore=0.0, patience=4, ema=0.5)
    assert isinstance(source, TaskSource)
    levels_seen = []
    for solved in (4, 4, 4, 2, 0, 0):  # all right x3, half right (inside the band), all wrong x2
        tasks = source.sample(4)
        levels_seen.append({t.meta["level"] for t in tasks})
        source.observe(tasks, _rewards(4, solved))
    # Rounds at levels 0, 1, 2 (solved: up, up, top), 2 (rate 1 -> 1 + (1 - 0.5^4)(0.5 - 1) = 0.53125: in the
    # band, stays), 2 (0.53125 -> 0.53125 / 16 = 0.0332 < 0.2: down), 1 (1 -> 1 / 16 = 0.0625 < 0.2: down).
    assert levels_seen == [{0}, {1}, {2}, {2}, {2}, {1}]
    assert source.level == 0
    assert source.state_dict()["rates"] == [1.0, 0.0625, pytest.approx(0.53125 / 16)]


def test_the_level_waits_for_patience_groups_and_stops_at_the_ends():
    source = _curriculum(explore=0.0, patience=6)
    source.observe(source.sample(4), _rewards(4, 4))
    assert source.level == 0  # 4 < 6 groups seen at level 0
    source.observe(source.sample(4), _rewards(4, 4))
    assert source.level == 1  # 8 groups, rate 1 > 0.8
    assert next_level(0, 0.0, 100, 3, 0.2, 0.8, 1) == 0  # no level below the easiest
    assert next_level(2, 1.0, 100, 3, 0.2, 0.8, 1) == 2  # nor above the hardest
    assert next_level(1, None, 100, 3, 0.2, 0.8, 1) == 1  # not measured: stays


def test_explore_draws_only_neighbours_at_the_configured_rate():
    source = _curriculum(explore=0.2, start_level=1, seed=3)
    levels = [t.meta["level"] for t in source.sample(2000)]
    assert set(levels) == {0, 1, 2}
    assert abs(levels.count(1) / 2000 - 0.8) < 0.04  # binomial std 0.009
    assert abs(levels.count(0) - levels.count(2)) < 0.1 * 2000  # the two neighbours alike
    at_bottom = [t.meta["level"] for t in _curriculum(explore=0.2, seed=3).sample(500)]
    assert set(at_bottom) == {0, 1}  # level 0's only neighbour is level 1


def test_group_solve_rates_and_the_moving_rate_by_hand():
    rewards = torch.tensor([[1.0, 1.0, 0.9, 0.0],  # 0.9 is not solved: 2/4
                            [1.2, NAN, 0.0, NAN],  # 1.2 (>= 1) solved, NaN not judged: 1/2
                            [NAN, NAN, NAN, NAN]])  # nothing judged: None
    assert group_solve_rates(rewards) == [0.5, 0.5, None]
    assert moving_rate(None, 0.3, 5, 0.1) == 0.3  # first measurement
    # 0.5 + (1 - 0.9^2) * (0.0 - 0.5) = 0.5 - 0.19 * 0.5 = 0.405
    assert moving_rate(0.5, 0.0, 2, 0.1) == pytest.approx(0.405)


def test_observe_metrics_by_hand():
    source = _curriculum(ema=0.5)
    tasks = [_task(0), _task(0), _task(1), _task(2)]
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.9],  # level 0: 3/4
                            [1.0, 1.0, 1.0, 1.0],  # level 0: 4/4
                            [1.0, 0.0, NAN, NAN],  # level 1: 1/2
                            [NAN, NAN, NAN, NAN]])  # level 2: not judged, left out
    metrics = source.observe(tasks, rewards)
    assert metrics == {
        "curriculum/level_mean": 0.75,  # (0 + 0 + 1 + 2) / 4
        "curriculum/share_L0": 0.5, "curriculum/share_L1": 0.25, "curriculum/share_L2": 0.25,
        "curriculum/solve_rate_L0": 0.875,  # (0.75 + 1.0) / 2
        "curriculum/solve_rate_L1": 0.5,
        "curriculum/in_band_frac": pytest.approx(2 / 3),  # 0.75 and 0.5 lie in [0.2, 0.8], 1.0 does not
        "curriculum/level": 0.0,  # 2 groups at level 0 < patience 8
        "curriculum/rate_ema_L0": 0.875, "curriculum/rate_ema_L1": 0.5,  # first measurements
    }
    metrics = source.observe(tasks[:2], _rewards(2, 1))  # level 0 groups at 1/4 each
    # 0.875 + (1 - 0.5^2) * (0.25 - 0.875) = 0.875 - 0.46875 = 0.40625
    assert metrics["curriculum/rate_ema_L0"] == pytest.approx(0.40625)
    assert metrics["curriculum/share_L2"] == 0.0 and metrics["curriculum/in_band_frac"] == 1.0


def test_state_round_trip_reproduces_the_stream_and_the_statistics():
    def play(source: CurriculumSource, rounds: int, start: int) -> list[tuple]:
        out = []
        for r in range(start, start + rounds):
            tasks = source.sample(5)
            metrics = source.observe(tasks, _rewards(5, [4, 4, 3, 1, 0, 0, 2][r % 7]))
            out.append(([(t.id, t.prompt) for t in tasks], metrics))
        return out

    first = _curriculum(seed=2, patience=3, ema=0.5)
    play(first, 4, 0)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON
    resumed = _curriculum(seed=2, patience=3, ema=0.5)
    resumed.load_state_dict(state)
    expected = play(first, 6, 4)
    assert play(resumed, 6, 4) == expected
    assert [m["curriculum/level"] for _, m in expected] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]  # it moved
    assert resumed.state_dict() == first.state_dict()
    fresh = _curriculum(seed=2, patience=3, ema=0.5)  # the comparison can fail: a source not resumed differs
    assert play(fresh, 6, 4) != expected
    with pytest.raises(ValueError, match="seed"):
        _curriculum(seed=5).load_state_dict(state)


def test_the_held_out_set_is_an_equal_mix_and_no_level_trains_on_any_levels_held_out_problem():
    # Level 1 ('+' only) draws from a subset of level 0's problems ('+' and '-'), so its own stream does
    # land on level 0's held-out problems; the curriculum must skip those.
    levels = [ArithmeticSource(digits=1, operators="+-", seed=1, eval_size=30),
              ArithmeticSource(digits=1, operators="+", seed=2, eval_size=30)]
    source = CurriculumSource(levels, seed=0, eval_size=30, explore=0.5)  # half from each level
    held = source.eval_tasks(30)
    assert [t.meta["level"] for t in held[:6]] == [0, 1, 0, 1, 0, 1]
    assert len({t.prompt for t in held}) == 30 and source.eval_tasks(30) == held  # fixed, no duplicates
    all_held = {t.prompt for lv in levels for t in lv.eval_tasks(30)}
    raw = ArithmeticSource(digits=1, operators="+", seed=2, eval_size=30).sample(300)
    assert any(t.prompt in all_held for t in raw)  # the filter has something to do
    source.observe(source.sample(4), _rewards(4, 2))
    train = source.sample(300)
    assert {t.meta["level"] for t in train} == {0, 1}
    assert not any(t.prompt in all_held for t in train)
    docs = list(source.corpus(300))
    assert len(docs) == 300 and not any(doc.startswith(p) for doc in docs for p in all_held)
    assert any("-" in doc.split("?")[0] for doc in docs)  # level 0's '-' problems are in the mix


def test_from_config_builds_distinct_level_streams_with_the_overrides():
    from engine.config import compose_config

    cfg = compose_config(["task.source=curriculum", "task.eval_size=8",
                          "task.curriculum.levels=[{digits:1},{digits:2,operands:3}]",
                          "task.curriculum.explore=1.0"])
    source = load_task_source("curriculum", cfg.task, seed=4)
    assert isinstance(source, CurriculumSource)
    tasks = source.sample(200)  # explore=1 at level 0: all from level 1
    assert {t.meta["level"] for t in tasks} == {1}
    assert all(sum(t.meta["expression"].count(op) for op in "+-") == 2 for t in tasks)  # 3 operands
    assert max(int(n) for t in tasks for n in t.meta["expression"].replace("-", "+").split("+")) >= 10
    # level seeds are seed * L + l
    assert source.state_dict()["levels"] == [{"seed": 8, "index": 0}, {"seed": 9, "index": 200}]
    assert len({t.id for t in tasks + source.eval_tasks(8)}) == 208
    same = load_task_source("curriculum", cfg.task, seed=4)
    assert [t.prompt for t in same.sample(200)] == [t.prompt for t in tasks]


def test_levels_of_linear_equations_override_list_knobs():
    from engine.config import compose_config

    cfg = compose_config(["task.source=curriculum", "task.eval_size=8", "task.curriculum.base=linear_equations",
                          "task.curriculum.levels=[{coefficient_range:3,forms:[one_sided]},{forms:[two_sided]}]",
                          "task.curriculum.explore=0.5"])
    tasks = load_task_source("curriculum", cfg.task, seed=0).sample(40)
    for task in tasks:  # one x on the left at level 0 (a*x+b=c, |numbers| <= 3), x on both sides at level 1
        assert task.meta["equation"].count("x") == 1 + task.meta["level"], task
    assert {t.meta["level"] for t in tasks} == {0, 1}


@pytest.mark.parametrize("override, names", [
    ("task.curriculum.levels=[{digits:1},{digitz:2}]", "task.curriculum.levels[1] sets digitz"),
    ("task.curriculum.levels=[{digits:0}]",
     "task.curriculum.levels[0]={'digits': 0}: task.arithmetic.digits"),
    ("task.curriculum.levels=[{digits:two}]", "task.curriculum.levels[0]={'digits': 'two'}"),
    ("task.curriculum.base=file", "task.curriculum.levels[0] sets digits, which task.file does not have"),
    ("task.curriculum.base=tests.engine.plugins:AlwaysRight", "task.curriculum.base="),
    ("task.curriculum.base=curriculum", "task.curriculum.base='curriculum'"),
    ("task.curriculum.low=0.9", "task.curriculum.low=0.9 / task.curriculum.high=0.8"),
    ("task.curriculum.ema=0", "task.curriculum.ema=0"),
    ("task.curriculum.explore=1.5", "task.curriculum.explore=1.5"),
    ("task.curriculum.patience=0", "task.curriculum.patience=0"),
    ("task.curriculum.start_level=3", "task.curriculum.start_level=3"),
    ("task.curriculum.levels=[]", "task.curriculum.levels is empty"),
])
def test_config_errors_name_the_field(override, names):
    from engine.config import compose_config

    with pytest.raises(ValueError) as err:  # ConfigError (a ValueError) at compose, or ValueError at build
        cfg = compose_config(["task.source=curriculum", override])
        load_task_source("curriculum", cfg.task, seed=0)
    assert names in str(err.value)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_two_rl_steps_through_the_real_loop_log_the_curriculum(ray_local, tmp_path) -> None:
    from engine.checkpoint import read_state
    from engine.cli import run_stage
    from engine.config import compose_config
    from engine.metrics import read_metrics

    # The tiny random model is built from the curriculum's corpus and solves no 2- or 3-digit sum: every
    # rate is 0 < low, so with patience 2 and no exploration the level steps down once per step, 2 -> 1 -> 0.
    args = ["stage=rl", "progress=false", f"runs_dir={tmp_path}", "model.initializer_range=0.3",
            "corpus_docs=200",
            "task.source=curriculum", "task.eval_size=4", "task.curriculum.start_level=2",
            "task.curriculum.patience=2", "task.curriculum.explore=0.0", "steps=2",
            "rl.prompts_per_step=4", "rollout.n=4", "rollout.max_tokens=8", "rollout.temperature=1.0",
            "rollout.kv_cache_gib=0.5", f"rollout.shm_dir={tmp_path}", "learner.batch_size=16",
            "learner.micro_batch_size=16", "learner.lr=1e-2", "learner.lr_schedule=constant",
            "learner.warmup_steps=0", "cluster.learners=1", "cluster.num_cpus=4"]
    result = run_stage(compose_config(args))
    records = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}
    assert records[1]["rollout/reward_mean"] == 0.0 and records[2]["rollout/reward_mean"] == 0.0
    assert records[1]["curriculum/level_mean"] == 2.0 and records[1]["curriculum/share_L2"] == 1.0
    assert records[1]["curriculum/solve_rate_L2"] == 0.0 and records[1]["curriculum/in_band_frac"] == 0.0
    assert records[1]["curriculum/level"] == 1.0
    assert records[2]["curriculum/level_mean"] == 1.0 and records[2]["curriculum/level"] == 0.0
    assert not any(math.isnan(v) for r in records.values() for v in r.values() if isinstance(v, float))
    state = read_state(result.run_dir / "final")["task_source"]
    assert state["position"] == 8 and state["level"] == 0 and state["rates"] == [None, 0.0, 0.0]
    assert [lv["index"] for lv in state["levels"]] == [0, 4, 4]
