"""`assay verify` and `assay serve-verifiers`: score a JSONL file, or serve a verifier pool over gRPC.

`engine/cli.py` builds the `assay` command and dispatches to `add_*_args` / `run_*` here; `main`
makes the module usable on its own (`python -m verifiers.cli verify ...`).

`verify` reads `{"response": ..., "reference": ...}` lines (optional `id`, `prompt`, `meta`), writes
each line back with `score`, `reason` and `outcome` added (`pass`, `fail`, or `infra_error` with an
`error` kind and a None score: the verifier itself failed, see `verifiers.base.INFRA_ERRORS`), and
prints a one-line JSON summary to stderr. Every line, the verifier name and every `--option` (against
the verifier's constructor) are checked before any scoring.

Stdout stays pure JSONL: what the verifier prints, in its worker processes, is captured by the pool
(the tail of each item's output ends its `reason`) and appended to the `--log` file, by default
`<output>.log` next to `--output`, else `assay-verify.log` in the current directory; the file is
created only when a verifier printed something.

A line whose reference the verifier cannot read (a gold solution with no parsable answer, say)
gets `score: null`, `outcome: infra_error`, `error: bad_reference` and the reason, and is counted in
the summary's `bad_reference`; it does not change the exit code (the file's data, not the verifier,
is at fault). `--strict` checks every reference first (the verifier's `check_reference`) and refuses
the file, naming its lines, before scoring anything.

Exit codes: 0 every item was judged, or left unjudged only for a bad reference; 2 a usage or input
error (a bad line, unknown verifier or option, a bad reference under `--strict`; the message names
it, nothing is scored); 3 some items were infra errors of the verifier itself (every line is still
written; the summary counts them).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
import threading
from collections import Counter
from contextlib import redirect_stdout
from typing import Any

from verifiers.base import Task, Verdict
from verifiers.pool import VerifierPool, check_options
from verifiers.registry import UnknownVerifierError

EXIT_USAGE = 2
EXIT_INFRA_ERRORS = 3  # some items could not be judged: the verifier itself failed on them
DEFAULT_LOG = "assay-verify.log"


class InputError(ValueError):
    """A malformed input line (the message names the file and line)."""


def add_verify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verifier", required=True, help="entry-point name (math, unit_tests) or module:Class")
    parser.add_argument("--input", required=True, help='JSONL file of {"response": ..., "reference": ...} lines')
    parser.add_argument("--output", default=None, help="JSONL file to write (default: stdout)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="verifier constructor option (VALUE parsed as JSON if it can be, else a string); repeatable",
    )
    parser.add_argument("--workers", type=int, default=2, help="process workers")
    parser.add_argument("--timeout", type=float, default=10.0, help="hard limit per response, seconds")
    parser.add_argument("--log", default=None, metavar="FILE",
                        help=f"where the verifier's captured output goes (default: OUTPUT.log, or {DEFAULT_LOG})")
    parser.add_argument("--strict", action="store_true",
                        help="refuse the file (exit 2) when a reference cannot be read, naming its lines")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=50051, help="port to bind (0 picks a free one)")
    parser.add_argument("--workers", type=int, default=2, help="process workers")
    parser.add_argument("--timeout", type=float, default=10.0, help="hard limit per response, seconds")
    parser.add_argument(
        "--option", action="append", default=[], metavar="VERIFIER.KEY=VALUE",
        help="constructor option for one verifier, e.g. unit_tests.memory_mb=1024; repeatable",
    )
    parser.add_argument("--max-tasks-per-worker", type=int, default=0, help="recycle a worker after N items")
    parser.add_argument("--log", default=None, metavar="FILE",
                        help="append the verifiers' captured output here (default: it is only kept in reasons)")


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); value is JSON when it parses (`3`, `true`, `"x"`), else the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def read_items(path: str, verifier: str) -> tuple[list[dict[str, Any]], list[tuple[str, Task]], list[str]]:
    """The input records, their `(response, Task)` items and where each is (`path:line`); InputError
    names `path:line`."""
    records: list[dict[str, Any]] = []
    items: list[tuple[str, Task]] = []
    places: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if not isinstance(rec.get("response"), str):
                raise InputError(f"{where}: expected a string field 'response', got {rec.get('response')!r:.60}")
            if "reference" not in rec:
                raise InputError(f"{where}: missing field 'reference'")
            meta = rec.get("meta", {})
            if not isinstance(meta, dict):
                raise InputError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
            task = Task(str(rec.get("id", lineno)), rec.get("prompt", ""), rec["reference"], verifier, meta)
            records.append(rec)
            items.append((rec["response"], task))
            places.append(where)
    return records, items, places


def run_verify(args: argparse.Namespace) -> int:
    with redirect_stdout(sys.stderr):  # a verifier module that prints on import cannot reach the JSONL
        try:
            options = dict(parse_option(o) for o in args.option)
            if args.workers < 1 or args.timeout <= 0:
                raise ValueError(f"--workers must be >= 1 and --timeout > 0, got {args.workers} and {args.timeout}")
            check_options(args.verifier, options)
            records, items, places = read_items(args.input, args.verifier)
            if args.strict:
                check_references(items, places, args.verifier, options)
        except (InputError, ValueError, UnknownVerifierError, OSError) as exc:
            print(f"assay verify: {exc}", file=sys.stderr)
            return EXIT_USAGE
        log = args.log or (f"{args.output}.log" if args.output else DEFAULT_LOG)
        with VerifierPool(args.workers, args.timeout, options={args.verifier: options}, log_path=log) as pool:
            verdicts = pool.score(items)
    lines = [json.dumps({**rec, **_fields(v)}) + "\n" for rec, v in zip(records, verdicts)]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.writelines(lines)
    else:
        sys.stdout.writelines(lines)
    print(json.dumps({"summary": summary(verdicts)}), file=sys.stderr)
    verifier_failed = any(v.outcome == "infra_error" and v.error != "bad_reference" for v in verdicts)
    return EXIT_INFRA_ERRORS if verifier_failed else 0


def check_references(items: list[tuple[str, Task]], places: list[str], verifier: str, options: dict[str, Any]) -> None:
    """`--strict`: InputError naming every line whose reference the verifier cannot read (nothing when
    the verifier has no `check_reference`)."""
    from verifiers import registry

    check = getattr(registry.load(verifier, **options), "check_reference", None)
    if check is None:
        return
    bad = [f"{where}: {why}" for where, (_, task) in zip(places, items) if (why := check(task.reference)) is not None]
    if bad:
        more = f"; ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(f"{len(bad)} of {len(items)} references cannot be read (--strict): {'; '.join(bad[:5])}{more}")


def _fields(v: Verdict) -> dict[str, Any]:
    """What one output line adds to its input record."""
    return {"score": v.score, "reason": v.reason, "outcome": v.outcome, **({"error": v.error} if v.error else {})}


def summary(verdicts: list[Verdict]) -> dict[str, Any]:
    """Counts by outcome, the mean of the judged scores, and the infra errors by kind."""
    outcomes = Counter(v.outcome for v in verdicts)
    scores = [v.score for v in verdicts if v.score is not None]
    errors = Counter(v.error for v in verdicts if v.error)
    return {
        "count": len(verdicts),
        "mean_score": sum(scores) / len(scores) if scores else 0.0,
        "pass": outcomes["pass"], "fail": outcomes["fail"], "infra_error": outcomes["infra_error"],
        "timeouts": errors["timeout"], "bad_reference": errors["bad_reference"],
        "errors": dict(sorted(errors.items())),
    }


def run_serve(args: argparse.Namespace) -> int:
    from verifiers.service import serve  # grpc is only needed here

    try:
        options: dict[str, dict[str, Any]] = {}
        for text in args.option:
            key, value = parse_option(text)
            name, dot, field = key.rpartition(".")
            if not dot or not name:
                raise ValueError(f"--option {text!r}: expected VERIFIER.KEY=VALUE")
            options.setdefault(name, {})[field] = value
        pool = VerifierPool(args.workers, args.timeout, options, max_tasks_per_worker=args.max_tasks_per_worker,
                            log_path=args.log)
    except (ValueError, UnknownVerifierError) as exc:
        print(f"assay serve-verifiers: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints every thread's stack
    try:
        with pool:
            try:
                server = serve(args.host, args.port, pool)
            except OSError as exc:
                print(f"assay serve-verifiers: {exc}", file=sys.stderr)
                return EXIT_USAGE
            print(f"serving verifiers on {server.endpoint} with {args.workers} workers", flush=True)
            while not stop.wait(0.5):  # a timed wait: the main thread returns to run the signal handler
                pass
            server.stop(grace_s=2.0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verifiers.cli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_verify_args(sub.add_parser("verify", help="score a JSONL file of responses"))
    add_serve_args(sub.add_parser("serve-verifiers", help="serve a verifier pool over gRPC"))
    args = parser.parse_args(argv)
    return run_verify(args) if args.command == "verify" else run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
