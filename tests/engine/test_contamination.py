"""Contamination check: longest shared word n-grams on hand-built overlaps, and `assay contamination` end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.contamination import check, flag_contaminated, longest_shared_ngrams, tokens
from verifiers.base import Task

ROOT = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(100)]  # 100 distinct tokens: an item built from them repeats none
ITEM = " ".join(WORDS[:30])


def with_run(start: int, length: int) -> str:
    """A training text that contains exactly `length` consecutive tokens of ITEM, among unrelated words."""
    return "alpha beta " + " ".join(WORDS[start:start + length]) + " gamma delta"


def test_tokens_lowercase_and_split_on_punctuation():
    assert tokens("Solve for x: 3*x+4=19!") == ["solve", "for", "x", "3", "x", "4", "19"]
    assert tokens("What is 12+7?") == ["what", "is", "12", "7"]  # not "127"
    assert tokens("The QUICK, brown—fox's") == ["the", "quick", "brown", "fox", "s"]
    assert tokens("  \n") == []


def test_a_shared_13_gram_is_flagged_and_a_12_gram_is_not():
    thirteen, twelve = check([ITEM, ITEM], [with_run(5, 13)]), check([ITEM], [with_run(5, 12)])
    assert (thirteen[0].longest, thirteen[0].flagged) == (13, True)
    assert thirteen[0].shared == " ".join(WORDS[5:18]) and thirteen[0].match_id == "0"
    assert thirteen[0].fraction == round(13 / 30, 4)
    assert (twelve[0].longest, twelve[0].flagged) == (12, False)
    assert check([ITEM], [with_run(5, 12)], n=12)[0].flagged  # n is the knob


def test_case_and_punctuation_do_not_hide_an_overlap():
    shouted = "ALPHA: " + ", ".join(w.upper() for w in WORDS[10:23]) + "!"
    assert check([ITEM], [shouted])[0].longest == 13


def test_the_longest_overlap_over_many_training_texts_is_reported_with_its_text():
    train = [with_run(0, 4), with_run(20, 9), "nothing shared here", with_run(2, 6)]
    (result,) = check([ITEM], train, against_ids=["a", "b", "c", "d"])
    assert (result.longest, result.match_id, result.shared) == (9, "b", " ".join(WORDS[20:29]))


def test_an_ngram_never_spans_two_training_texts():
    halves = [" ".join(WORDS[0:7]), " ".join(WORDS[7:14])]  # together they hold 14 consecutive tokens
    assert check([ITEM], halves)[0].longest == 7
    items = [" ".join(WORDS[0:3]), " ".join(WORDS[3:6])]  # nor two items: each shares only its own 3
    assert [r.longest for r in check(items, [" ".join(WORDS[0:6])])] == [3, 3]


def test_threshold_flags_short_items_contained_whole():
    results = check(["What is 12+7?", "What is 3+4?"], ["Quiz: what is 12 + 7? Answer: 19"], threshold=1.0)
    assert [(r.longest, r.tokens, r.flagged) for r in results] == [(4, 4, True), (2, 4, False)]
    assert not any(r.flagged for r in check(["What is 12+7?"], ["what is 12 + 7"]))  # 4 < 13, no threshold


def test_nothing_shared_and_empty_sides():
    assert check(["a b c"], [])[0].longest == 0
    (empty,) = check([""], ["a b c"])
    assert (empty.longest, empty.fraction, empty.flagged, empty.match_id) == (0, 0.0, False, "")
    with pytest.raises(ValueError, match="n must be >= 1"):
        check(["a"], ["a"], n=0)
    with pytest.raises(ValueError, match="threshold"):
        check(["a"], ["a"], threshold=1.5)


def test_longest_shared_ngrams_matches_brute_force_on_random_texts():
    def brute(item, others):
        return max([k for o in others for i in range(len(item)) for j in range(len(o))
                    for k in [next((k for k in range(min(len(item) - i, len(o) - j)) if item[i + k] != o[j + k]),
                                   min(len(item) - i, len(o) - j))]], default=0)

    rng = random.Random(0)
    for _ in range(150):  # a 2-4 letter alphabet: many partial overlaps
        vocab = "abcd"[: rng.randint(2, 4)]
        items = [[rng.choice(vocab) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(1, 4))]
        others = [[rng.choice(vocab) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(0, 4))]
        for item, found in zip(items, longest_shared_ngrams(items, others)):
            assert found.length == brute(item, others), (item, others, found)
            if found.length:  # the reported text really holds the reported n-gram
                gram, text = item[found.start:found.start + found.length], others[found.match]
                assert any(text[j:j + found.length] == gram for j in range(len(text)))


def test_flag_contaminated_returns_the_buffer_indices_that_overlap_the_eval_set():
    eval_tasks = [Task("e0", ITEM, "1", "math"), Task("e1", [{"role": "user", "content": "tiny"}], "1", "math")]
    buffer = [Task(f"b{i}", text, "1", "math") for i, text in
              enumerate([with_run(3, 12), with_run(3, 13), "unrelated words only", with_run(10, 20)])]
    assert flag_contaminated(buffer, eval_tasks) == [1, 3]
    assert flag_contaminated(buffer, eval_tasks, n=12) == [0, 1, 3]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_prints_a_table_and_writes_per_item_json(tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": with_run(0, 13), "answer": "1", "id": "t1"},
                                                     {"prompt": with_run(15, 12), "answer": "2", "id": "t2"}])
    held = _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": ITEM, "answer": "1", "id": "q-full"},
                                                   {"prompt": " ".join(WORDS[14:40]), "answer": "2", "id": "q-12"},
                                                   {"prompt": "fresh question", "answer": "3", "id": "q-new"}])
    out = tmp_path / "report.json"
    code = main(["contamination", "--train", str(train), "--eval", str(held), "--n", "13",
                 "--columns", "id=id", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "1 of 3 eval items flagged (longest shared n-gram >= 13 tokens); 2 training tasks" in printed
    assert any(line.split()[:5] == ["0", "q-full", "30", "13", "yes"] for line in printed.splitlines())
    report = json.loads(out.read_text())
    assert (report["n"], report["flagged"], report["train_tasks"]) == (13, 1, 2)
    assert [(r["id"], r["longest"], r["flagged"], r["match_id"]) for r in report["items"]] == [
        ("q-full", 13, True, "t1"), ("q-12", 12, False, "t2"), ("q-new", 0, False, "")]


def test_cli_reports_a_bad_file_and_exits_2(tmp_path, capsys):
    held = _write_jsonl(tmp_path / "eval.jsonl", [{"question": "x", "answer": "1"}])
    code = main(["contamination", "--train", str(held), "--eval", str(held)])
    assert code == 2 and "field 'prompt' is missing" in capsys.readouterr().err
    assert main(["contamination", "--train", str(held), "--eval", str(held), "--columns", "question"]) == 2


@pytest.mark.slow
def test_cli_runs_as_the_assay_command(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": with_run(0, 13), "answer": "1"}])
    held = _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": ITEM, "answer": "1"}])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "engine.cli", "contamination", "--train", str(train),
                             "--eval", str(held), "--out", str(tmp_path / "r.json")],
                            check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 of 1 eval items flagged" in result.stdout
    (item,) = json.loads((tmp_path / "r.json").read_text())["items"]
    assert (item["longest"], item["match_id"]) == (13, f"{train}:1")  # no id column: <file>:<line>
