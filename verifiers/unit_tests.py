"""`UnitTestVerifier`: score generated code by running unit tests in the sandbox (`verifiers.sandbox`).

Two reference formats in `task.reference`:

- HumanEval style `{"test": "<code defining check(candidate)>", "entry_point": "name", "prompt": "..."}`
  (`prompt` optional). Score 1.0 when `check(candidate)` returns, else 0.0.
  Prompt rule: when a prompt is given it is always prepended. If the extracted code defines the entry
  point itself (a top-level `def name(`), the program is `prompt + "\\n" + code`: the model's
  definition replaces the prompt's stub, and the prompt's imports and helpers (HumanEval/32's `poly`)
  stay available. Otherwise the code is a body continuation and the program is `prompt + code`,
  exactly as HumanEval builds it (`prompt + canonical_solution`).
- I/O style `{"cases": [{"stdin": "...", "stdout": "..."}, ...]}`. Each case is one sandboxed run of
  the program as `__main__`; a case passes when the program exits 0 within the time limit and its
  output equals the expected output after stripping trailing whitespace from every line and trailing
  blank lines. Score = fraction of cases passed (partial credit, a denser reward than
  all-or-nothing; `partial_credit=False` gives 1.0 only when all pass and stops at the first
  failure). Every case gets the full `timeout_s`, so a task can take up to `len(cases) * timeout_s`:
  size the pool's per-item timeout for that. The expected output never enters the sandbox, and an
  output more than twice (+1 KiB) as long as expected is rejected unread.

Code extraction from the response: the last ```python (or ```py) fenced block, else the last fenced
block of any language, else an unclosed trailing fence, else the whole text.

How a HumanEval-style test is decided (why exit code 0 never suffices). A harness runs two processes
in the sandbox: the *checker* (trusted: the task's prompt and test, `check`) and the *candidate* (the
model's program). The checker makes itself non-dumpable, so the candidate (same uid) cannot read its
memory, fds or environment through /proc or ptrace, and forks the candidate before it reads its
stdin; the candidate's stdin becomes `/dev/null` before any model code runs and its stdout goes to
stderr. Only then does the checker read, from stdin, the test code and a per-run random token
(`secrets.token_hex(16)`): neither ever exists in the candidate's memory.
`check` gets a proxy: each call is sent to the candidate as marshal data and the result comes back as
marshal data, which can only hold plain builtin values (int, str, list, dict, ...; checked again on
arrival), so an object whose `__eq__` always returns True cannot come back at all. The checker prints
the token after `check` returns; the verdict passes only when the token is the last line of stdout
and the checker exited 0. `os._exit(0)`, `sys.exit`, killing the parent or the process group all end
without the token. When the task's own prompt or test fails to load (before any call reaches the
candidate) the checker exits 3 and the verdict is `None` (cannot judge) instead of a 0 that would
blame the model.

Residual risks: the candidate sees the arguments of every call (but neither the test's expected
values nor the token), so a program that tabulates answers for inputs it has seen elsewhere still
passes; tests that need in-place mutation of arguments, or arguments that are not marshal-able
(functions, custom classes), do not work through the proxy (all 164 HumanEval tests do); marshal
parsing of candidate bytes in the checker is not hardened against crafted input (a crash fails the
run, it cannot pass it); the sandbox's own limits are listed in `verifiers.sandbox`.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from verifiers.base import Task, Verdict
from verifiers.sandbox import Limits, RunResult, file_path, resolve_isolation, run_files

_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```([^\n`]*)\n(.*)\Z", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")
_OPTIONS = ("isolation", "partial_credit")
_BAD_REFERENCE = 3  # harness exit code: the task's own prompt or test failed to load

# The in-sandbox harness (stdlib only). argv: candidate file, entry point. stdin: JSON with token,
# prompt and test. See the module docstring for the protocol and why it is built this way.
_HARNESS = r'''
import ctypes, json, marshal, os, struct, sys, builtins

_PLAIN = (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset)


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("the candidate process ended")
        buf += chunk
    return bytes(buf)


def _send(fd, obj):
    data = marshal.dumps(obj)
    _write_all(fd, struct.pack("<Q", len(data)) + data)


def _recv(fd, limit=1 << 26):
    (n,) = struct.unpack("<Q", _read_exact(fd, 8))
    if n > limit:
        raise ValueError("candidate reply too large")
    return marshal.loads(_read_exact(fd, n))


def _is_plain(value, depth=0):
    if depth > 100 or type(value) not in _PLAIN:
        return False
    if type(value) is dict:
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in value.items())
    if type(value) in (tuple, list, set, frozenset):
        return all(_is_plain(v, depth + 1) for v in value)
    return True


def _serve(program_path, entry_point, req_fd, resp_fd):
    """Candidate process: load the program, then answer calls until the checker closes the pipe."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    sys.stdin = open(0, closefd=False)
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        with open(program_path, encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, "candidate.py", "exec"), namespace)
        fn = namespace[entry_point]
    except BaseException as exc:
        _send(resp_fd, ("error", type(exc).__name__, str(exc)[:2000]))
        return
    _send(resp_fd, ("ready",))
    while True:
        try:
            args, kwargs = _recv(req_fd)
        except EOFError:
            return
        try:
            reply = marshal.dumps(("ok", fn(*args, **kwargs)))
        except BaseException as exc:
            reply = marshal.dumps(("error", type(exc).__name__, str(exc)[:2000]))
        _write_all(resp_fd, struct.pack("<Q", len(reply)) + reply)


def _raise(name, message):
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        raise cls(message)
    raise RuntimeError(name + ": " + message)


def _proxy(req_fd, resp_fd):
    def candidate(*args, **kwargs):
        _send(req_fd, (args, kwargs))
        reply = _recv(resp_fd)
        if reply[0] == "ok":
            if not _is_plain(reply[1]):
                raise TypeError("candidate returned a value that is not plain data")
            return reply[1]
        _raise(reply[1], reply[2])
    return candidate


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4: no /proc/<pid>/mem, fd, environ, ptrace
        sys.exit("harness: prctl(PR_SET_DUMPABLE, 0) failed")
    program_path, entry_point = sys.argv[1], sys.argv[2]
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:  # before the checker reads stdin: the candidate never holds the token or test
        os.close(req_w)
        os.close(resp_r)
        try:
            _serve(program_path, entry_point, req_r, resp_w)
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(resp_w)
    payload = json.loads(sys.stdin.buffer.read())
    token = payload.pop("token")
    status = _recv(resp_r)
    if status[0] != "ready":
        sys.exit("candidate failed to load: %s: %s" % (status[1], status[2]))
    candidate = _proxy(req_w, resp_r)
    namespace = {"__name__": "__check__"}
    try:  # trusted code only: a failure here is the task's fault, reported as exit code 3
        if payload.get("prompt"):
            exec(compile(payload["prompt"], "prompt.py", "exec"), namespace)
        exec(compile(payload["test"], "test.py", "exec"), namespace)
        check = namespace["check"]
    except BaseException as exc:
        sys.stderr.write("bad reference: %s: %s\n" % (type(exc).__name__, exc))
        os._exit(3)
    namespace[entry_point] = candidate
    del payload
    check(candidate)
    sys.stdout.write("\n" + token + "\n")
    sys.stdout.flush()


main()
'''


class UnitTestVerifier:
    """Runs the task's unit tests on the response's code; see the module docstring for the rules.

    Building it raises `SandboxUnavailable` (one line) where bubblewrap is missing or broken: it never
    runs model-written code in anything weaker (`verifiers.sandbox`).
    """

    name = "unit_tests"

    def __init__(
        self, timeout_s: float = 10.0, memory_mb: int = 512, max_output_bytes: int = 1 << 20, **options: Any
    ) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(
                f"UnitTestVerifier: unknown options {unknown}; accepted: {list(_OPTIONS)} "
                "plus timeout_s, memory_mb, max_output_bytes"
            )
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
        self.isolation = resolve_isolation(options.get("isolation", "auto"))
        self.partial_credit = bool(options.get("partial_credit", True))

    def verify(self, response: str, task: Task) -> Verdict:
        """Score 1.0 / 0.0 (HumanEval style) or the fraction of I/O cases passed; never raises on model output."""
        reference = task.reference
        code = extract_code(response)
        if isinstance(reference, dict) and "cases" in reference:
            return self._verify_io(code, _cases(task))
        if isinstance(reference, dict) and "test" in reference and "entry_point" in reference:
            return self._verify_check(code, reference)
        raise ValueError(
            f"task {task.id!r}: reference for unit_tests must be a dict with 'cases' (I/O style) or "
            f"'test' and 'entry_point' (HumanEval style), got {type(reference).__name__} "
            f"{sorted(reference) if isinstance(reference, dict) else ''}"
        )

    def _verify_check(self, code: str, reference: dict[str, Any]) -> Verdict:
        entry_point = str(reference["entry_point"])
        program = build_program(code, entry_point, reference.get("prompt"))
        token = secrets.token_hex(16)
        payload = json.dumps(
            {"token": token, "prompt": reference.get("prompt") or "", "test": reference["test"]}
        )
        args = (file_path("candidate.py", self.isolation), entry_point)
        try:
            result = run_files(
                {"harness.py": _HARNESS, "candidate.py": program},
                "harness.py",
                payload,
                args=args,
                limits=self.limits,
                isolation=self.isolation,
            )
        except OSError as exc:
            return Verdict(None, f"sandbox error: {exc}")
        if result.returncode == _BAD_REFERENCE and not (result.timed_out or result.output_exceeded):
            return Verdict(None, _failure(result), _run_metrics(result, False))  # the test, not the model
        passed = result.returncode == 0 and _last_line(result.stdout) == token
        reason = "passed" if passed else _failure(result)
        return Verdict(float(passed), reason, _run_metrics(result, passed))

    def _verify_io(self, code: str, cases: list[tuple[str, str]]) -> Verdict:
        passed, run, wall_s, timeouts, first_failure = 0, 0, 0.0, 0, ""
        for i, (stdin, expected) in enumerate(cases):
            run += 1
            try:
                result = run_files(
                    {"main.py": code}, "main.py", stdin, limits=self.limits, isolation=self.isolation
                )
            except OSError as exc:
                return Verdict(None, f"sandbox error: {exc}")
            wall_s += result.wall_s
            timeouts += result.timed_out
            ok = result.returncode == 0 and not result.timed_out and not result.output_exceeded
            if ok and outputs_match(result.stdout, expected):
                passed += 1
                continue
            first_failure = first_failure or f"case {i}: " + (_failure(result) if not ok else "wrong output")
            if not self.partial_credit:  # the score is 0 now; skip the remaining cases
                break
        total = len(cases)
        score = passed / total if self.partial_credit else float(passed == total)
        reason = f"{passed}/{total} cases passed" + (
            f"; first failure: {first_failure}" if first_failure else ""
        )
        metrics = {
            "verifier/cases_passed": float(passed),
            "verifier/cases_total": float(total),
            "verifier/cases_run": float(run),
            "verifier/passed": float(passed == total),
            "verifier/timeouts": float(timeouts),
            "verifier/sandbox_wall_s": wall_s,
        }
        return Verdict(score, reason, metrics)


def extract_code(response: str) -> str:
    """The last ```python block, else the last fenced block, else an unclosed trailing fence, else all."""
    blocks = _FENCE.findall(response)
    for tag, body in reversed(blocks):
        if tag.strip().lower() in _PYTHON_TAGS:
            return body
    if blocks:
        return blocks[-1][1]
    tail = _OPEN_FENCE.search(response)
    return tail.group(2) if tail else response


def build_program(code: str, entry_point: str, prompt: str | None) -> str:
    """The candidate program: see the prompt rule in the module docstring."""
    if not prompt:
        return code
    if re.search(rf"^(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return prompt + "\n" + code
    return prompt + code


def outputs_match(actual: str, expected: str) -> bool:
    """Equal after rstripping every line and dropping trailing blank lines; wildly long output loses unread."""
    if len(actual) > 2 * len(expected) + 1024:
        return False
    return _lines(actual) == _lines(expected)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _cases(task: Task) -> list[tuple[str, str]]:
    cases = task.reference["cases"]
    if not isinstance(cases, list) or not cases:
        raise ValueError(
            f"task {task.id!r}: reference['cases'] must be a non-empty list of {{'stdin', 'stdout'}}"
        )
    out = []
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or "stdout" not in case:
            raise ValueError(
                f"task {task.id!r}: reference['cases'][{i}] must be a dict with 'stdout' (and 'stdin')"
            )
        out.append((str(case.get("stdin", "")), str(case["stdout"])))
    return out


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _failure(result: RunResult) -> str:
    if result.output_exceeded:
        return "output limit exceeded"
    if result.timed_out:
        return f"timeout after {result.wall_s:.1f}s"
    tail = [line for line in result.stderr.strip().splitlines() if line.strip()]
    detail = tail[-1].strip()[:300] if tail else "no error output"
    return f"failed (exit {result.returncode}): {detail}"


def _run_metrics(result: RunResult, passed: bool) -> dict[str, float]:
    return {
        "verifier/passed": float(passed),
        "verifier/timeouts": float(result.timed_out),
        "verifier/output_exceeded": float(result.output_exceeded),
        "verifier/sandbox_wall_s": result.wall_s,
    }
