"""Preference pairs: the file source (rows checked at load, chat messages, column mapping, held-out split),
the generated arithmetic pairs, and the preference batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.tasks import TaskConfig, load_task_source
from engine.tasks.files import TaskFileError
from engine.tasks.pairs import ArithmeticPairsSource, PairFileSource
from verifiers.math import MathVerifier


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"What is {i}+1?\n", "chosen": f"\\boxed{{{i + 1}}}", "rejected": f"\\boxed{{{i + 2}}}"}
            for i in range(n)]


def test_a_pair_file_streams_tasks_whose_meta_holds_both_sides(tmp_path: Path) -> None:
    source = PairFileSource(str(write_jsonl(tmp_path / "p.jsonl", pairs(20))), eval_size=4, seed=1)
    task = source.sample(1)[0]
    assert task.meta["chosen"] != task.meta["rejected"] and task.meta["response"] == task.meta["chosen"]
    held = {t.prompt for t in source.eval_tasks(4)}
    train = {t.prompt for t in source.sample(32)}  # two epochs of the 16 training pairs
    assert not held & train and len(train) == 16
    assert source.training_pairs() == 16


@pytest.mark.parametrize(("steps", "expected"), [(2, 8), (5, 16)])
def test_the_dpo_stage_reads_ahead_the_pairs_its_steps_draw(tmp_path: Path, steps: int, expected: int) -> None:
    from types import SimpleNamespace

    from engine.preference import drawn_pairs

    source = PairFileSource(str(write_jsonl(tmp_path / "p.jsonl", pairs(20))), eval_size=4, seed=1)
    cfg = SimpleNamespace(steps=steps, learner=SimpleNamespace(batch_size=4))
    ahead = drawn_pairs(source, cfg)  # 2 steps x 4: 8 pairs; 5 x 4 = 20 draws cover all 16
    assert len({t.meta["pair"] for t in ahead}) == len(ahead) == expected
    assert [t.meta["pair"] for t in source.sample(steps * 4)][:expected] == [t.meta["pair"] for t in ahead]


def test_resume_continues_the_same_stream(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "p.jsonl", pairs(20)))
    first = PairFileSource(path, eval_size=4, seed=3)
    first.sample(5)
    state = first.state_dict()
    expected = [t.id for t in first.sample(20)]
    second = PairFileSource(path, eval_size=4, seed=3)
    second.load_state_dict(state)
    assert [t.id for t in second.sample(20)] == expected


def test_chat_messages_and_the_implicit_prompt_form(tmp_path: Path) -> None:
    prompt = [{"role": "user", "content": "2+2?"}]
    rows = [{"q": prompt, "good": [*prompt, {"role": "assistant", "content": "4"}],
             "bad": [{"role": "assistant", "content": "5"}], "key": 7}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    source = PairFileSource(str(path), columns={"prompt": "q", "chosen": "good", "rejected": "bad", "id": "key"},
                            eval_size=0)
    task = source.sample(1)[0]
    assert task.prompt == prompt and (task.meta["chosen"], task.meta["rejected"]) == ("4", "5")
    assert task.id == "7@0"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, r"p.jsonl:2: field 'rejected' is missing \(expected a string or a list"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, r"p.jsonl:2: field 'rejected' is int 3"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, r"p.jsonl:2: field 'prompt' is str ''"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, r"p.jsonl:2: chosen and rejected are the same text"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
         r"p.jsonl:2: field 'chosen' is list .* the last 'user'"),
    ],
)
def test_a_bad_row_names_file_line_and_field(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [pairs(1)[0], row])
    with pytest.raises(TaskFileError, match=message):
        PairFileSource(str(path), eval_size=0, eval_path=str(path))


def test_parquet_with_a_column_mapping(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pairs(10)
    table = pa.table({"question": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
                      "rejected": [r["rejected"] for r in rows]})
    pq.write_table(table, tmp_path / "p.parquet")
    source = PairFileSource(str(tmp_path / "p.parquet"), columns={"prompt": "question"}, eval_size=2)
    assert source.training_pairs() == 8
    with pytest.raises(TaskFileError, match="column 'answer' .* is missing"):
        PairFileSource(str(tmp_path / "p.parquet"), columns={"prompt": "question", "reference": "answer"}, eval_size=2)


def test_arithmetic_pairs_prefer_the_right_answer_which_the_verifier_checks() -> None:
    cfg = TaskConfig(source="arithmetic_pairs", eval_size=16)
    cfg.arithmetic.digits, cfg.arithmetic.operators, cfg.arithmetic.answer_format = 2, "+", "reversed"
    cfg.pairs.size = 64
    source = load_task_source("arithmetic_pairs", cfg, seed=0)
    assert isinstance(source, ArithmeticPairsSource)
    verifier = MathVerifier()
    for task in [*source.sample(64), *source.eval_tasks(16)]:
        assert verifier.verify(task.meta["chosen"], task).score == 1.0
        assert verifier.verify(task.meta["rejected"], task).score == 0.0
    again = load_task_source("arithmetic_pairs", cfg, seed=0)
    assert [t.meta["rejected"] for t in again.eval_tasks(16)] == [t.meta["rejected"] for t in source.eval_tasks(16)]
