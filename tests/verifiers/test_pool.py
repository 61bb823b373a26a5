"""verifiers.pool: real worker processes, hard timeouts, crash replacement, exactly-once scoring,
infra errors that are never scores, and captured worker output."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.verifiers.plugins import PATH
from verifiers.base import Task, Verdict, infra_error
from verifiers.pool import OUTPUT_TAIL_BYTES, VerifierPool
from verifiers.registry import UnknownVerifierError

ECHO, SLEEPY, CRASHING, SPAWNING = (f"{PATH}:{c}" for c in ("EchoVerifier", "SleepyVerifier", "CrashingVerifier",
                                                             "SpawningVerifier"))
MISBEHAVING, TEN_POINT = f"{PATH}:MisbehavingVerifier", f"{PATH}:TenPointVerifier"


def task(verifier: str, id: str = "t", reference: object = "") -> Task:
    return Task(id, "", reference, verifier)


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=1.0) as p:
        yield p


def test_results_come_back_in_input_order(pool: VerifierPool) -> None:
    # Sleeps are chosen so items finish in a different order than they were sent.
    delays = ["0.3", "0", "0.2", "0", "0.1", "0"]
    verdicts = pool.score([(d, task(SLEEPY, str(i))) for i, d in enumerate(delays)])
    assert [v.reason for v in verdicts] == [f"slept {d}" for d in delays]


def test_scores_and_verdict_fields_round_trip(pool: VerifierPool) -> None:
    verdicts = pool.score([("a", task(ECHO, reference="a")), ("b", task(ECHO, reference="a")),
                           ("x", task(ECHO, reference=None))])
    assert verdicts == [Verdict(1.0, "echo", {"length": 1.0}), Verdict(0.0, "echo", {"length": 1.0}),
                        Verdict(None, "no reference")]


def test_hanging_item_times_out_while_the_rest_score(pool: VerifierPool) -> None:
    items = [("hang", task(SLEEPY))] + [("a", task(ECHO, str(i), "a")) for i in range(5)]
    verdicts = pool.score(items)
    assert verdicts[0] == infra_error("timeout", "timeout: verify ran past timeout_s=1")
    assert [v.score for v in verdicts[1:]] == [1.0] * 5


def test_crashing_worker_is_replaced_and_the_batch_completes(pool: VerifierPool) -> None:
    items = [("ok", task(CRASHING)), ("crash", task(CRASHING)), ("raise", task(CRASHING))]
    items += [("ok", task(CRASHING)) for _ in range(5)]
    verdicts = pool.score(items)
    assert verdicts[1] == infra_error("crash", "crash: the worker died (exit code 13)")
    assert verdicts[2] == infra_error("error", "error: verify raised ValueError: bad input")
    assert [v.reason for v in verdicts[3:]] == ["fine"] * 5 and verdicts[0].reason == "fine"
    # Both workers serve the next batch (two 0.3 s sleeps in parallel stay under the 1 s timeout).
    assert [v.score for v in pool.score([("0.3", task(SLEEPY)), ("0.3", task(SLEEPY))])] == [1.0, 1.0]


def test_every_item_is_verified_exactly_once(tmp_path: Path) -> None:
    # EchoVerifier appends each task id to <log_dir>/<pid>.log; crashes and hangs share the batch.
    items: list[tuple[str, Task]] = []
    for i in range(30):
        items.append(("a", task(ECHO, f"e{i}", "a")))
        if i % 10 == 3:
            items.append(("crash", task(CRASHING, f"c{i}")))
        if i % 10 == 7:
            items.append(("hang", task(SLEEPY, f"h{i}")))
    with VerifierPool(2, 1.0, options={ECHO: {"log_dir": str(tmp_path)}}) as pool:
        verdicts = pool.score(items)
    logged = Counter(line for f in tmp_path.glob("*.log") for line in f.read_text().split())
    assert logged == Counter(f"e{i}" for i in range(30))
    assert len(verdicts) == 36  # 30 echoes + 3 crashes + 3 hangs
    assert Counter(v.error or v.reason for v in verdicts) == Counter({"echo": 30, "crash": 3, "timeout": 3})


def test_building_a_verifier_does_not_count_against_the_item_timeout() -> None:
    # SlowStartVerifier takes 1.5 s to construct, longer than the 1 s per-item timeout.
    with VerifierPool(1, 1.0) as pool:
        assert pool.score([("a", task(f"{PATH}:SlowStartVerifier"))]) == [Verdict(1.0, "built")]


def test_workers_that_cannot_start_fail_the_call_instead_of_hanging() -> None:
    # Every worker builds the verifiers named in `options` before taking work; this one never finishes.
    slow = f"{PATH}:SlowStartVerifier"
    with (
        VerifierPool(1, 0.5, options={slow: {"delay_s": 3600.0}}, build_timeout_s=0.5) as pool,
        pytest.raises(RuntimeError, match="3 verifier workers in a row failed to start"),
    ):
        pool.score([("a", task(ECHO, reference="a"))])


def test_timeout_kills_the_verifiers_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with VerifierPool(1, 1.0) as pool:
        assert [v.error for v in pool.score([(str(pid_file), task(SPAWNING))])] == ["timeout"]
    child = int(pid_file.read_text())
    assert _gone(child)


def test_metrics_count_per_verifier(tmp_path: Path) -> None:
    with VerifierPool(2, 1.0) as pool:
        pool.score([("a", task(ECHO, reference="a")), ("b", task(ECHO, reference="a")),
                    ("c", task(ECHO, reference="a")), ("raise", task(CRASHING)), ("hang", task(SLEEPY))])
        m = pool.metrics()
    # echo: 3 items, 1 of them matches -> score_mean = 1/3
    assert m["verifier/EchoVerifier/count"] == 3.0
    assert m["verifier/EchoVerifier/score_mean"] == pytest.approx(1 / 3)
    assert (m["verifier/EchoVerifier/errors"], m["verifier/EchoVerifier/timeouts"]) == (0.0, 0.0)
    assert (m["verifier/CrashingVerifier/errors"], m["verifier/CrashingVerifier/crashes"]) == (1.0, 0.0)
    assert (m["verifier/SleepyVerifier/timeouts"], m["verifier/SleepyVerifier/count"]) == (1.0, 1.0)
    assert (m["verifier/CrashingVerifier/infra_errors"], m["verifier/SleepyVerifier/infra_errors"]) == (1.0, 1.0)
    assert m["verifier/SleepyVerifier/latency_p99_s"] >= 1.0  # the timed-out item waited the full second
    assert m["verifier/EchoVerifier/latency_p50_s"] <= m["verifier/EchoVerifier/latency_p99_s"]
    assert m["verifier/workers"] == 2.0


def test_options_reach_the_verifier_built_once_per_worker(tmp_path: Path) -> None:
    with VerifierPool(1, 5.0, options={ECHO: {"tag": "-opt", "log_dir": str(tmp_path)}}) as pool:
        verdicts = pool.score([("a", task(ECHO, str(i), "a")) for i in range(4)])
    assert {v.reason for v in verdicts} == {"echo-opt"}
    assert len(list(tmp_path.glob("*.log"))) == 1  # one worker process did all four


def test_max_tasks_per_worker_recycles_workers(tmp_path: Path) -> None:
    # One worker, recycled after 2 items: 5 items run on 3 processes (2 + 2 + 1).
    with VerifierPool(1, 5.0, options={ECHO: {"log_dir": str(tmp_path)}}, max_tasks_per_worker=2) as pool:
        pool.score([("a", task(ECHO, str(i), "a")) for i in range(5)])
    assert sorted(len(f.read_text().split()) for f in tmp_path.glob("*.log")) == [1, 2, 2]


def test_concurrent_callers_share_the_pool(pool: VerifierPool) -> None:
    results: dict[int, list[Verdict]] = {}

    def run(k: int) -> None:
        results[k] = pool.score([(str(k), task(ECHO, f"{k}-{i}", str(k if i % 2 else -1))) for i in range(20)])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for k in range(4):
        assert [v.score for v in results[k]] == [0.0, 1.0] * 10


def test_unknown_verifier_raises_before_any_work(pool: VerifierPool) -> None:
    with pytest.raises(UnknownVerifierError, match="nope"):
        pool.score([("a", task(ECHO, reference="a")), ("a", task("nope"))])


def test_misspelt_options_key_is_a_config_error() -> None:
    with pytest.raises(UnknownVerifierError, match="mathh"):
        VerifierPool(1, 1.0, options={"mathh": {}})


def test_an_option_the_verifier_does_not_take_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"does not take the options \['tga'\].*its options: tag, log_dir"):
        VerifierPool(1, 1.0, options={ECHO: {"tga": "-x"}})


def test_verifier_failures_are_infra_errors_never_scores(pool: VerifierPool) -> None:
    # Raising, hanging past timeout_s, crashing the worker, a NaN and a 5.0 (the default range is
    # [0, 1]) are the verifier's failures: score None, outcome infra_error, the kind in `error`.
    responses = ["raise", "hang", "crash", "nan", "five", "1", "0.5", "0"]
    verifiers = [MISBEHAVING, SLEEPY, CRASHING, *[MISBEHAVING] * 5]
    verdicts = pool.score([(r, task(v, str(i))) for i, (r, v) in enumerate(zip(responses, verifiers))])
    assert [(v.score, v.outcome, v.error) for v in verdicts] == [
        (None, "infra_error", "error"), (None, "infra_error", "timeout"), (None, "infra_error", "crash"),
        (None, "infra_error", "invalid_score"), (None, "infra_error", "invalid_score"),
        (1.0, "pass", ""), (0.5, "fail", ""), (0.0, "fail", ""),  # pass = full credit, the top of the range
    ]
    assert verdicts[0].reason == "error: verify raised RuntimeError: the verifier broke"
    assert verdicts[3].reason == "invalid_score: nan is not a number in score_range [0, 1] (the verifier said: " \
        "not a number)"
    assert verdicts[4].reason.startswith("invalid_score: 5.0 is not a number in score_range [0, 1]")


def test_a_declared_score_range_sets_pass_and_bounds() -> None:
    with VerifierPool(1, 5.0) as pool:
        verdicts = pool.score([(r, task(TEN_POINT, r)) for r in ("10", "5", "0", "11", "-1")])
    assert [(v.score, v.outcome, v.error) for v in verdicts] == [
        (10.0, "pass", ""), (5.0, "fail", ""), (0.0, "fail", ""),
        (None, "infra_error", "invalid_score"), (None, "infra_error", "invalid_score"),
    ]


def test_a_verifier_that_cannot_be_built_is_an_infra_error() -> None:
    # SlowStartVerifier(delay_s="x") raises TypeError in time.sleep: the build fails, each item says so,
    # and another verifier in the same worker still judges.
    with VerifierPool(1, 5.0, options={f"{PATH}:SlowStartVerifier": {"delay_s": "x"}}) as pool:
        bad, good = pool.score([("a", task(f"{PATH}:SlowStartVerifier")), ("b", task(ECHO, reference="b"))])
    assert (bad.score, bad.outcome, bad.error) == (None, "infra_error", "build")
    assert good == Verdict(1.0, "echo", {"length": 1.0})
    assert bad.reason.startswith("build: cannot build verifier") and "TypeError" in bad.reason


def test_worker_output_is_captured_bounded_and_logged(tmp_path: Path) -> None:
    # 200 kB to stdout and to stderr, a child's line and a last line: the tail ends the reason and the
    # log, bounded by OUTPUT_TAIL_BYTES; output before a hang is kept with the timeout's reason too.
    log = tmp_path / "verifier.log"
    with VerifierPool(1, 2.0, log_path=log) as pool:
        printed, hung, quiet = pool.score([("print:200000", task(MISBEHAVING, "p")),
                                           ("print-hang", task(MISBEHAVING, "h")), ("1", task(MISBEHAVING, "q"))])
    assert (printed.score, printed.outcome) == (1.0, "pass")
    assert printed.reason.startswith(f"printed\n[verifier output, last {OUTPUT_TAIL_BYTES} of 400024 bytes]\n")
    assert printed.reason.endswith("STDERR-END\nCHILD-SAYS-HI\nLAST-LINE\n")  # the child's output too
    assert len(printed.reason) < OUTPUT_TAIL_BYTES + 100
    assert hung.error == "timeout"
    assert hung.reason == "timeout: verify ran past timeout_s=2\n[verifier output, 14 bytes]\nABOUT-TO-HANG\n"
    assert quiet.reason == "as told"  # nothing printed: nothing added
    text = log.read_text()
    assert len(text) < 2 * OUTPUT_TAIL_BYTES + 1000  # two bounded blocks, not 400 kB
    assert "MisbehavingVerifier task p: pass" in text and text.count("LAST-LINE") == 1
    assert "MisbehavingVerifier task h: infra_error timeout" in text and "ABOUT-TO-HANG" in text


def test_closed_pool_refuses_work() -> None:
    pool = VerifierPool(1, 1.0)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score([("a", task(ECHO, reference="a"))])


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (gone or a zombie); SIGKILL lands asynchronously, so poll a while."""
    for _ in range(200):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):  # reaped between open and read: ESRCH
            return True
        time.sleep(0.05)
    return False


def test_close_releases_a_caller_still_waiting(tmp_path: Path) -> None:
    pool = VerifierPool(1, 60.0)
    pid_file = tmp_path / "child.pid"
    errors: list[BaseException] = []

    def call() -> None:
        try:
            pool.score([(str(pid_file), task(SPAWNING))])  # hangs until the pool is closed
        except RuntimeError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    while not pid_file.exists() or not pid_file.read_text():  # the item is running in the worker
        caller.join(timeout=0.05)
    pool.close()
    caller.join(timeout=30)
    assert not caller.is_alive()
    assert len(errors) == 1 and "closed while this call waited" in str(errors[0])
    assert _gone(int(pid_file.read_text()))


def test_builtin_verifiers_share_one_batch() -> None:
    # `math` and `unit_tests` resolve through the entry points; options reach unit_tests' constructor.
    square = {"test": "def check(f):\n    assert f(3) == 9\n", "entry_point": "square"}
    items = [
        ("so \\boxed{\\frac{1}{2}}", Task("m1", "", "0.5", "math")),
        ("def square(x):\n    return x * x\n", Task("u1", "", square, "unit_tests")),
        ("\\boxed{3}", Task("m2", "", "4", "math")),
        ("def square(x):\n    return x + x\n", Task("u2", "", square, "unit_tests")),  # 3 + 3 != 9
    ]
    with VerifierPool(2, 60.0, options={"unit_tests": {"timeout_s": 20.0, "memory_mb": 256}}) as pool:
        verdicts = pool.score(items)
        m = pool.metrics()
    assert [v.score for v in verdicts] == [1.0, 1.0, 0.0, 0.0]
    assert (m["verifier/math/count"], m["verifier/unit_tests/count"]) == (2.0, 2.0)
