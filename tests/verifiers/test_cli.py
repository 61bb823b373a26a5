"""verifiers.cli: `verify` on a JSONL file and `serve-verifiers` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.verifiers.plugins import PATH, start_server
from verifiers.base import Task
from verifiers.cli import EXIT_INFRA_ERRORS, main, parse_option
from verifiers.pool import OUTPUT_TAIL_BYTES
from verifiers.service import RemoteVerifierPool

ECHO, MISBEHAVING = f"{PATH}:EchoVerifier", f"{PATH}:MisbehavingVerifier"
REPO = Path(__file__).resolve().parents[2]


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
        {"response": "4", "reference": "4", "id": "a", "score": 1.0, "reason": "echo-cli", "outcome": "pass"},
        {"response": "5", "reference": "4", "score": 0.0, "reason": "echo-cli", "outcome": "fail"},
        {"response": "hang", "reference": "4", "score": 0.0, "reason": "echo-cli", "outcome": "fail"},
    ]
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["summary"]
    # 3 responses, one correct -> mean 1/3
    assert summary == {"count": 3, "mean_score": pytest.approx(1 / 3), "pass": 1, "fail": 2, "infra_error": 0,
                       "timeouts": 0, "bad_reference": 0, "errors": {}}
    assert not Path(f"{out}.log").exists()  # the verifier printed nothing: no log file


def test_verify_counts_timeouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": r, "reference": ""}) for r in ("0", "hang")])
    assert main(["verify", "--verifier", f"{PATH}:SleepyVerifier", "--input", src, "--timeout", "1"]) == 3
    captured = capsys.readouterr()
    assert [json.loads(line)["reason"] for line in captured.out.splitlines()] == [
        "slept 0", "timeout: verify ran past timeout_s=1"]
    assert json.loads(captured.err.strip().splitlines()[-1])["summary"]["timeouts"] == 1


def test_verify_exits_3_when_the_verifier_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A verifier that raises, hangs, returns NaN or 5.0 (range [0, 1]): infra errors, score None, rc 3;
    # the judged items and every line are still written.
    responses = ["raise", "print-hang", "nan", "five", "1", "0"]
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": r, "reference": ""}) for r in responses])
    rc = main(["verify", "--verifier", MISBEHAVING, "--input", src, "--timeout", "1", "--log", str(tmp_path / "v.log")])
    assert rc == EXIT_INFRA_ERRORS == 3
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["score"], r["outcome"], r.get("error")) for r in rows] == [
        (None, "infra_error", "error"), (None, "infra_error", "timeout"), (None, "infra_error", "invalid_score"),
        (None, "infra_error", "invalid_score"), (1.0, "pass", None), (0.0, "fail", None),
    ]
    assert captured.out.count("ABOUT-TO-HANG") == 1 and rows[1]["reason"].endswith("ABOUT-TO-HANG\n")  # its reason
    summary = json.loads(captured.err.strip().splitlines()[-1])["summary"]
    assert summary == {"count": 6, "mean_score": 0.5, "pass": 1, "fail": 1, "infra_error": 4, "timeouts": 1, "bad_reference": 0,
                       "errors": {"error": 1, "invalid_score": 2, "timeout": 1}}
    assert "ABOUT-TO-HANG" in (tmp_path / "v.log").read_text()


def test_unknown_option_is_a_usage_error_before_any_item_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # EchoVerifier logs every call to log_dir: an unknown option must stop the command before any call.
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": "4", "reference": "4"})])
    calls = tmp_path / "calls"
    calls.mkdir()
    rc = main(["verify", "--verifier", ECHO, "--input", src, "--option", f"log_dir={calls}", "--option", "tga=-x"])
    assert rc == 2
    captured = capsys.readouterr()
    assert "does not take the options ['log_dir', 'tga']" in captured.err and "its options: tag, log_dir" in captured.err
    assert captured.out == "" and not list(calls.iterdir())


def test_a_printing_verifier_leaves_stdout_pure_jsonl(tmp_path: Path) -> None:
    # A real `verify` process; the verifier writes 100 kB to stdout and 100 kB to stderr per item.
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"response": "print:100000", "reference": ""})] * 3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "verifiers.cli", "verify", "--verifier", MISBEHAVING, "--input", src],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is JSON
    assert [r["score"] for r in rows] == [1.0, 1.0, 1.0]
    assert all(r["reason"].endswith("CHILD-SAYS-HI\nLAST-LINE\n") for r in rows)
    assert len(proc.stdout) < 3 * (OUTPUT_TAIL_BYTES + 500)  # each line bounded, not 200 kB
    assert len(proc.stderr) < 500 and "STDERR-END" not in proc.stderr  # just the summary
    log = (tmp_path / "assay-verify.log").read_text()  # the default log, in the current directory
    assert log.count("LAST-LINE") == 3 and len(log) < 3 * (OUTPUT_TAIL_BYTES + 500)


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


def test_a_reference_the_math_verifier_cannot_read_is_null_counted_and_refused_only_with_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"response": "\\boxed{7}", "reference": "We add: $3+4 = \\boxed{7}$."}),  # a gold solution
        json.dumps({"response": "\\boxed{7}", "reference": "\\frac{7}{"}),
        json.dumps({"response": "\\boxed{1}, \\boxed{2}", "reference": "\\boxed{1} and \\boxed{2}"}),
    ])
    assert main(["verify", "--verifier", "math", "--input", src, "--workers", "1", "--timeout", "30"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["score"] for r in rows] == [1.0, None, 1.0]
    assert rows[1]["error"] == "bad_reference" and "not parsable" in rows[1]["reason"], rows[1]
    summary = json.loads(captured.err.strip().splitlines()[-1])["summary"]
    assert (summary["bad_reference"], summary["infra_error"], summary["pass"]) == (1, 1, 2)
    assert main(["verify", "--verifier", "math", "--input", src, "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"1 of 3 references cannot be read (--strict): {src}:2: the reference" in err


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
        try:
            assert proc.wait(timeout=60) == 0
        except subprocess.TimeoutExpired:  # once, under heavy load in CI: leave its stacks in stderr
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            raise
    finally:
        proc.kill()
