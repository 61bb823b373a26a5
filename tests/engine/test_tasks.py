"""Task sources: arithmetic answers, determinism, resume, held-out disjointness, task files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.tasks import ArithmeticConfig, FileConfig, Task, TaskConfig, TaskSource, load_task_source
from engine.tasks.arithmetic import ArithmeticSource, carry_free_sum, evaluate
from engine.tasks.base import DEFAULT_COLUMNS
from engine.tasks.files import FileSource, TaskFileError, read_rows

# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("12+7", 19),
        ("3-7", -4),
        ("2+3*4", 14),  # 3*4 = 12 first, then 2+12
        ("10-2-3", 5),  # left to right: (10-2)-3
        ("7*0-5", -5),
        ("2*3*4-1", 23),
    ],
)
def test_evaluate_by_hand(expression, value):
    assert evaluate(expression) == value


def test_arithmetic_answers_match_python_eval():
    source = ArithmeticSource(digits=2, operands=3, operators="+-*", seed=1, eval_size=16)
    for task in source.sample(300) + source.eval_tasks(16):
        expression = task.meta["expression"]
        assert task.prompt == f"What is {expression}?\n"
        assert task.reference == str(eval(expression))  # independent path: Python's own parser
        assert task.meta["response"] == f"Answer: {task.reference}"
        assert task.verifier == "math"


def test_demonstrations_satisfy_the_math_verifier():
    # The contract between the task format and `verifiers.math`: "Answer: <n>" is extracted and
    # scores 1; an off-by-one answer scores 0 (negative answers included).
    from verifiers.registry import load

    verifier = load("math")
    for task in ArithmeticSource(digits=2, operands=3, operators="+-*", seed=2, eval_size=4).sample(40):
        assert verifier.verify(task.meta["response"], task).score == 1.0, task
        assert verifier.verify(f"Answer: {int(task.reference) + 1}", task).score == 0.0, task


@pytest.mark.parametrize(("expression", "value"), [("47+85", 22), ("99+99", 88), ("10+20", 30), ("5+5+5", 5),
                                                   ("123+0", 123)])
def test_carry_free_sum_by_hand(expression, value):
    assert carry_free_sum(expression) == value


def test_reversed_answers_are_zero_padded_and_least_significant_first():
    source = ArithmeticSource(digits=2, operands=2, operators="+", seed=0, eval_size=8, answer_format="reversed")
    for task in source.sample(200) + source.eval_tasks(8):
        a, b = (int(x) for x in task.meta["expression"].split("+"))
        assert task.reference == f"{a + b:03d}"[::-1]  # 47+85=132 -> "231"; 10+20=30 -> "030"
        assert task.meta["response"] == f"\\boxed{{{task.reference}}}"
    three = ArithmeticSource(digits=1, operands=3, operators="+", eval_size=4, answer_format="reversed")
    assert all(len(t.reference) == 2 for t in three.sample(20))  # widest sum 27: two digits


def test_a_flawed_teacher_drops_carries_at_the_configured_rate_and_the_reference_stays_right():
    from verifiers.registry import load

    verifier = load("math")
    source = ArithmeticSource(digits=2, operands=2, operators="+", seed=0, eval_size=8, answer_format="reversed",
                              teacher_accuracy=0.4)
    tasks = source.sample(2000)
    right = 0
    for task in tasks:
        a, b = (int(x) for x in task.meta["expression"].split("+"))
        assert task.reference == f"{a + b:03d}"[::-1]
        shown = task.meta["response"].removeprefix("\\boxed{").removesuffix("}")
        assert shown in (task.reference, f"{carry_free_sum(task.meta['expression']):03d}"[::-1])
        right += verifier.verify(task.meta["response"], task).score == 1.0
    # 40% chosen right, and a carry-free sum is right anyway when no column carries (~30% of 2-digit sums)
    assert 0.52 < right / len(tasks) < 0.64
    assert all(t.meta["response"] == f"\\boxed{{{t.reference}}}" for t in source.eval_tasks(8))
    assert ArithmeticSource(digits=2, operands=2, operators="+", seed=0, eval_size=8, answer_format="reversed",
                            teacher_accuracy=0.4).sample(50) == tasks[:50]  # seeded


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"answer_format": "roman"}, "answer_format='roman'"),
        ({"answer_format": "reversed", "operators": "+-"}, "answer_format=reversed is defined for addition only"),
        ({"teacher_accuracy": 0.5, "operators": "+*"}, "teacher_accuracy=0.5 is defined for addition only"),
        ({"teacher_accuracy": 1.5, "operators": "+"}, "teacher_accuracy=1.5: expected a fraction"),
    ],
)
def test_answer_format_and_teacher_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ArithmeticSource(**kwargs)


def test_arithmetic_difficulty_knobs():
    tasks = ArithmeticSource(digits=3, operands=4, operators="*", seed=0, eval_size=4).sample(50)
    for task in tasks:
        numbers = task.meta["expression"].split("*")
        assert len(numbers) == 4 and all(0 <= int(n) < 1000 for n in numbers)


def test_arithmetic_stream_is_reproducible_and_resumable():
    a, b = ArithmeticSource(seed=7), ArithmeticSource(seed=7)
    first = a.sample(5)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    rest = a.sample(7)
    b.load_state_dict(state)
    assert b.sample(7) == rest
    assert ArithmeticSource(seed=7).sample(12) == first + rest  # chunking does not change the stream
    assert [t.prompt for t in ArithmeticSource(seed=8).sample(12)] != [t.prompt for t in first + rest]


def test_arithmetic_state_of_another_seed_is_refused():
    with pytest.raises(ValueError, match="seed 1"):
        ArithmeticSource(seed=2).load_state_dict(ArithmeticSource(seed=1).state_dict())


def test_arithmetic_held_out_set_is_fixed_and_disjoint():
    # 1 digit, 2 operands, "+-": 10 * 10 * 2 = 200 problems, 64 of them held out
    source = ArithmeticSource(seed=3, eval_size=64)
    held = [t.meta["expression"] for t in source.eval_tasks(64)]
    assert len(set(held)) == 64
    assert held == [t.meta["expression"] for t in ArithmeticSource(seed=99, eval_size=64).eval_tasks(64)]
    assert source.eval_tasks(10) == source.eval_tasks(64)[:10]
    trained = {t.meta["expression"] for t in source.sample(2000)}
    pretrained = {doc.split("?")[0].removeprefix("What is ") for doc in source.corpus(500)}
    assert not set(held) & trained and not set(held) & pretrained
    assert len(trained) == 200 - 64  # 2000 draws cover every remaining problem


def test_arithmetic_corpus_documents_are_prompt_plus_response():
    docs = list(ArithmeticSource(seed=0).corpus(20))
    assert docs == list(ArithmeticSource(seed=0).corpus(20))
    for doc in docs:
        prompt, response = doc.split("\n")
        assert response == f"Answer: {eval(prompt.removeprefix('What is ').removesuffix('?'))}"


def test_arithmetic_rejects_bad_knobs():
    with pytest.raises(ValueError, match=r"task.arithmetic.operators='\+/'"):
        ArithmeticSource(operators="+/")
    with pytest.raises(ValueError, match="task.eval_size=150 must be between 0 and half of the 200"):
        ArithmeticSource(eval_size=150)
    with pytest.raises(ValueError, match=r"asked for 65 held-out tasks but task.eval_size is 64"):
        ArithmeticSource().eval_tasks(65)


# ---------------------------------------------------------------- the registry


def test_load_task_source_by_entry_point_and_by_path(tmp_path):
    cfg = TaskConfig(arithmetic=ArithmeticConfig(digits=2), eval_size=8)
    by_name = load_task_source("arithmetic", cfg, seed=4)
    by_path = load_task_source("engine.tasks.arithmetic:ArithmeticSource", cfg, seed=4)
    assert isinstance(by_name, TaskSource) and isinstance(by_name, ArithmeticSource)
    assert by_name.sample(5) == by_path.sample(5)
    assert by_name.eval_size == 8 and by_name.digits == 2

    path = _write_jsonl(tmp_path / "data.jsonl", _rows(6))
    file_source = load_task_source("file", TaskConfig(file=FileConfig(path=str(path)), eval_size=2), seed=0)
    assert isinstance(file_source, FileSource)


def test_load_task_source_unknown_names():
    with pytest.raises(ValueError, match=r"task.source='nope'.*known: .*arithmetic.*file"):
        load_task_source("nope", TaskConfig(), seed=0)
    with pytest.raises(ValueError, match=r"cannot load 'Missing' from 'engine.tasks.arithmetic'"):
        load_task_source("engine.tasks.arithmetic:Missing", TaskConfig(), seed=0)
    with pytest.raises(ValueError, match="needs task.file.path"):
        load_task_source("file", TaskConfig(), seed=0)


# ---------------------------------------------------------------- task files


def _rows(n: int) -> list[dict]:
    return [
        {"prompt": f"What is {i}+1?\n", "answer": str(i + 1), "response": f"Answer: {i + 1}"}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_file_source_jsonl_split_stream_and_resume(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", _rows(10))
    source = FileSource(str(path), seed=5, eval_size=3)
    held = source.eval_tasks(3)
    assert [t.id for t in held] == [t.id for t in FileSource(str(path), seed=6, eval_size=3).eval_tasks(3)]

    epoch0 = source.sample(7)  # 10 rows - 3 held out = one epoch of 7
    assert {t.prompt for t in epoch0}.isdisjoint({t.prompt for t in held})
    assert len({t.prompt for t in epoch0} | {t.prompt for t in held}) == 10
    assert all(t.id.endswith("@0") and t.verifier == "math" for t in epoch0)
    task = epoch0[0]
    assert task.reference == str(int(task.prompt.split()[2].split("+")[0]) + 1)
    assert task.meta["response"] == f"Answer: {task.reference}"

    state = json.loads(json.dumps(source.state_dict()))
    later = source.sample(10)  # crosses into epoch 2
    assert [t.id.split("@")[1] for t in later] == ["1"] * 7 + ["2"] * 3
    resumed = FileSource(str(path), seed=5, eval_size=3)
    resumed.load_state_dict(state)
    assert resumed.sample(10) == later
    assert FileSource(str(path), seed=5, eval_size=3).sample(17) == epoch0 + later

    docs = list(source.corpus(9))
    assert all(doc.startswith("What is ") and "\nAnswer: " in doc for doc in docs)
    assert not {doc.split("Answer")[0] for doc in docs} & {t.prompt for t in held}


def test_file_source_parquet_with_column_mapping_and_chat_prompts(tmp_path):
    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "question": [[{"role": "user", "content": f"What is {i}*2?"}] for i in range(6)],
            "gold": [i * 2 for i in range(6)],  # integers are accepted and become strings
            "uid": [f"q{i}" for i in range(6)],
        }
    )
    pq.write_table(table, path)
    columns = {"prompt": "question", "reference": "gold", "response": "", "id": "uid"}
    source = FileSource(str(path), columns=columns, verifier="my.mod:Check", seed=0, eval_size=2)
    tasks = source.sample(4)
    held = {t.id for t in source.eval_tasks(2)}
    trained = {t.id.removesuffix("@0") for t in tasks}
    assert not held & trained and held | trained == {f"q{i}" for i in range(6)}
    for task in tasks:
        i = int(task.id[1:].split("@")[0])
        assert task.prompt == [{"role": "user", "content": f"What is {i}*2?"}]
        assert task.reference == str(i * 2) and task.meta["response"] is None
        assert task.verifier == "my.mod:Check"


def test_file_source_separate_eval_file(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(8))
    held = _write_jsonl(tmp_path / "eval.jsonl", _rows(10)[6:])  # rows 6..9: 6 and 7 overlap train
    source = FileSource(str(train), eval_path=str(held), seed=0, eval_size=64)
    assert [t.prompt for t in source.eval_tasks(4)] == [r["prompt"] for r in _rows(10)[6:]]
    assert sorted(t.prompt for t in source.sample(6)) == sorted(
        r["prompt"] for r in _rows(6)
    )  # overlap dropped


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "answer": "1", "response": "r"', r"data.jsonl:3: invalid JSON"),
        ('["p", "1"]', r"data.jsonl:3: expected a JSON object, got list"),
        (
            '{"prompt": "p", "response": "r"}',
            r"data.jsonl:3: field 'answer' is missing \(expected a string\)",
        ),
        (
            '{"prompt": 5, "answer": "1", "response": "r"}',
            r"data.jsonl:3: field 'prompt' is int 5 \(expected a string or a list of chat messages\)",
        ),
        ('{"prompt": "p", "answer": null, "response": "r"}', r"data.jsonl:3: field 'answer' is null"),
        ('{"prompt": "p", "answer": 1.5, "response": "r"}', r"data.jsonl:3: field 'answer' is float 1.5"),
        ('{"prompt": "p", "answer": "1", "response": ["r"]}', r"data.jsonl:3: field 'response' is list"),
        (
            '{"prompt": [{"role": "user"}], "answer": "1", "response": "r"}',
            r"data.jsonl:3: field 'prompt' is list",
        ),
    ],
)
def test_file_source_bad_jsonl_rows(tmp_path, line, message):
    # line 2 is blank (skipped but counted), so the bad row is line 3
    path = _write_jsonl(tmp_path / "data.jsonl", [_rows(1)[0], "", line, *_rows(3)[1:]])
    with pytest.raises(TaskFileError, match=message):
        FileSource(str(path), eval_size=1)


def test_file_source_duplicate_ids(tmp_path):
    rows = [{**r, "id": "same"} for r in _rows(3)]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(TaskFileError, match=r"data.jsonl:2: id 'same' repeats the id of .*data.jsonl:1"):
        FileSource(str(path), columns={"id": "id"}, eval_size=1)


def test_file_source_bad_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None], "response": ["r", "s"]}), path)
    with pytest.raises(TaskFileError, match=r"data.parquet:2: field 'answer' is null \(expected a string\)"):
        FileSource(str(path), eval_size=1)
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["r", "s"]}), path)
    with pytest.raises(
        TaskFileError, match=r"data.parquet: column 'answer' \(task field 'reference'\) is missing"
    ):
        FileSource(str(path), eval_size=1)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(TaskFileError, match="junk.parquet: not a readable Parquet file"):
        FileSource(str(tmp_path / "junk.parquet"), eval_size=1)


def test_file_source_config_errors(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", _rows(4))
    with pytest.raises(ValueError, match="task.eval_size=4 leaves no training rows"):
        FileSource(str(path), eval_size=4)
    with pytest.raises(ValueError, match=r"task.file.columns: unknown task fields \['answer'\]"):
        FileSource(str(path), columns={"answer": "answer"})
    (tmp_path / "data.csv").write_text("prompt,answer\n")
    with pytest.raises(TaskFileError, match="set task.file.format"):
        FileSource(str(tmp_path / "data.csv"))
    with pytest.raises(TaskFileError, match="no such task file"):
        FileSource(str(tmp_path / "missing.jsonl"))


def test_task_is_reexported():
    from verifiers.base import Task as BaseTask

    assert Task is BaseTask


def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1", "response": "1"}\n{"prompt": "caf\xe9"}\n')  # byte 16 of line 2
    with pytest.raises(TaskFileError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_rows(path, DEFAULT_COLUMNS)

