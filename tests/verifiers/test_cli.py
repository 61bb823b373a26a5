"""verifiers.cli: `verify` on a JSONL file and `serve-verifiers` as a real process."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.verifiers.plugins import PATH, start_server
from verifiers.base import Task
from verifiers.cli import main, parse_option
from verifiers.service import RemoteVerifierPool

ECHO = f"{PATH}:EchoVerifier"


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_verify_writes_scores_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"response": "4", "reference": "4", "id": "a"}),
        "",  # blank lines are skipped
        json.dumps({"response": "5", "reference": "4"}),
        json.dumps({"response": "hang", "reference": "4"}),
    ])
    out = tmp_path / "out.jsonl"
    rc = main(["verify", "--verifier", ECHO, "--input", src, "--output", str(out), "--option", "tag=-cli",
               "--workers", "2", "--timeout", "5"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"response": "4", "reference": "4", "id": "a", "score": 1.0, "reason": "echo-cli"},
        {"response": "5", "reference": "4", "score": 0.0, "reason": "echo-cli"},
        {"response": "hang", "reference": "4", "score": 0.0, "reason": "echo-cli"},
    ]
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["summary"]
    # 3 responses, one correct -> mean 1/3
    assert summary == {"count": 3, "mean_score": pytest.approx(1 / 3), "timeouts": 0, "errors": 0}


def test_verify_counts_timeouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": r, "reference": ""}) for r in ("0", "hang")])
    assert main(["verify", "--verifier", f"{PATH}:SleepyVerifier", "--input", src, "--timeout", "1"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["reason"] for line in captured.out.splitlines()] == ["slept 0", "timeout"]
    assert json.loads(captured.err.strip().splitlines()[-1])["summary"]["timeouts"] == 1


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"response": "4", "reference": ', "not valid JSON"),
        ('["4", "4"]', "expected a JSON object"),
        ('{"reference": "4"}', "expected a string field 'response'"),
        ('{"response": "4"}', "missing field 'reference'"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad_line: str, expected: str
) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": "4", "reference": "4"}), bad_line])
    assert main(["verify", "--verifier", ECHO, "--input", src]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: " in err and expected in err


def test_unknown_verifier_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": "4", "reference": "4"})])
    assert main(["verify", "--verifier", "nope", "--input", src]) == 2
    assert "unknown verifier 'nope'" in capsys.readouterr().err


def test_parse_option_reads_json_values_else_strings() -> None:
    assert parse_option("memory_mb=1024") == ("memory_mb", 1024)
    assert parse_option("strict=true") == ("strict", True)
    assert parse_option("extract=lenient") == ("extract", "lenient")
    assert parse_option("sep=a=b") == ("sep", "a=b")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_option("novalue")


def test_verify_math_through_the_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"response": "so the answer is \\boxed{\\frac{1}{2}}", "reference": "0.5"}),
        json.dumps({"response": "\\boxed{3}", "reference": "4"}),
    ])
    assert main(["verify", "--verifier", "math", "--input", src, "--workers", "1", "--timeout", "30"]) == 0
    assert [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()] == [1.0, 0.0]


def test_verify_unit_tests_through_the_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = {"test": "def check(f):\n    assert f(2) == 4\n", "entry_point": "square"}
    src = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"response": "def square(x):\n    return x * x\n", "reference": reference}),
        json.dumps({"response": "def square(x):\n    return x + 1\n", "reference": reference}),
    ])
    assert main(["verify", "--verifier", "unit_tests", "--input", src, "--workers", "2", "--timeout", "30"]) == 0
    assert [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()] == [1.0, 0.0]


def test_serve_verifiers_answers_and_stops_on_sigterm() -> None:
    proc, endpoint = start_server(workers=1)
    try:
        with RemoteVerifierPool(endpoint, timeout_s=10.0) as c:
            assert [v.score for v in c.score([("a", Task("1", "", "a", ECHO)), ("b", Task("2", "", "a", ECHO))])] \
                == [1.0, 0.0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
