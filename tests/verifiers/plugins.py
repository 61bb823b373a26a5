"""Small verifiers for the pool, service and CLI tests, loaded as `tests.verifiers.plugins:Class`.

The response text drives what they do, so one batch can mix fast, hanging and crashing items.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from verifiers.base import Task, Verdict

PATH = "tests.verifiers.plugins"


class EchoVerifier:
    """Score 1.0 when the response equals the reference, else 0.0; None when the reference is None.
    The `tag` option is echoed in `reason`.

    With `log_dir`, every call appends the task id to `<log_dir>/<pid>.log` (to count calls).
    """

    name = "echo"

    def __init__(self, tag: str = "", log_dir: str | None = None) -> None:
        self.tag = tag
        self.log_dir = log_dir

    def verify(self, response: str, task: Task) -> Verdict:
        if self.log_dir:
            with open(os.path.join(self.log_dir, f"{os.getpid()}.log"), "a") as f:
                f.write(task.id + "\n")
        if task.reference is None:
            return Verdict(None, "no reference")
        score = 1.0 if response == str(task.reference) else 0.0
        return Verdict(score, f"echo{self.tag}", {"length": float(len(response))})


class SleepyVerifier:
    """Sleeps `float(response)` seconds, then scores 1.0. A response of "hang" sleeps for an hour."""

    name = "sleepy"

    def verify(self, response: str, task: Task) -> Verdict:
        time.sleep(3600.0 if response == "hang" else float(response))
        return Verdict(1.0, f"slept {response}")


class CrashingVerifier:
    """Kills its own process (`os._exit`) on "crash", raises on "raise", else scores 1.0."""

    name = "crashing"

    def verify(self, response: str, task: Task) -> Verdict:
        if response == "crash":
            os._exit(13)
        if response == "raise":
            raise ValueError("bad input")
        return Verdict(1.0, "fine")


class SpawningVerifier:
    """Starts `sleep 3600` as a child, writes the child's pid to the file named by the response, hangs."""

    name = "spawning"

    def verify(self, response: str, task: Task) -> Verdict:
        child = subprocess.Popen(["sleep", "3600"])
        with open(response, "w") as f:
            f.write(str(child.pid))
        child.wait()
        return Verdict(1.0, "child exited")


class SlowStartVerifier:
    """Takes `delay_s` to build (like a heavy import), then scores everything 1.0 at once."""

    name = "slow_start"

    def __init__(self, delay_s: float = 1.5) -> None:
        time.sleep(delay_s)

    def verify(self, response: str, task: Task) -> Verdict:
        return Verdict(1.0, "built")


class MisbehavingVerifier:
    """The response says how it fails: "raise" raises, "nan" and "five" return a NaN and a 5.0 score
    (outside the default range [0, 1]), "print:N" writes N bytes to stdout and N to stderr, and has
    a child process print a line, then scores 1.0; "print-hang" prints a line, then hangs. Anything else
    is a float score."""

    name = "misbehaving"

    def verify(self, response: str, task: Task) -> Verdict:
        if response == "raise":
            raise RuntimeError("the verifier broke")
        if response == "nan":
            return Verdict(float("nan"), "not a number")
        if response == "five":
            return Verdict(5.0, "too much")
        if response.startswith("print:"):
            size = int(response.partition(":")[2])
            sys.stdout.write("o" * (size - 11) + "STDOUT-END\n")
            sys.stderr.write("e" * (size - 11) + "STDERR-END\n")
            sys.stdout.flush()
            subprocess.run([sys.executable, "-c", "print('CHILD-SAYS-HI')"], check=True)
            sys.stderr.write("LAST-LINE\n")
            return Verdict(1.0, "printed")
        if response == "print-hang":
            print("ABOUT-TO-HANG", flush=True)
            time.sleep(3600.0)
        return Verdict(float(response), "as told")


class TenPointVerifier:
    """Declares `score_range = (0, 10)` and returns `float(response)` as the score."""

    name = "ten_point"
    score_range = (0.0, 10.0)

    def verify(self, response: str, task: Task) -> Verdict:
        return Verdict(float(response), "out of ten")


class NotAVerifier:
    """Has no `verify` method: the registry must refuse it."""


def start_server(workers: int = 1, timeout_s: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    """Run `python -m verifiers.cli serve-verifiers` on a free loopback port; (process, endpoint)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifiers.cli", "serve-verifiers", "--host", "127.0.0.1", "--port", "0",
         "--workers", str(workers), "--timeout", str(timeout_s)],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "serving verifiers on 127.0.0.1:PORT with N workers"
    match = re.search(r"on (\S+:\d+)", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"verifier server did not start: {line!r}")
    return proc, match.group(1)
