"""`assay verify` and `assay serve-verifiers`: score a JSONL file, or serve a verifier pool over gRPC.

`engine/cli.py` builds the `assay` command and dispatches to `add_*_args` / `run_*` here; `main`
makes the module usable on its own (`python -m verifiers.cli verify ...`).

`verify` reads `{"response": ..., "reference": ...}` lines (optional `id`, `prompt`, `meta`), writes
each line back with `score` and `reason` added, and prints a one-line JSON summary to stderr, so
stdout stays pure JSONL. Every line is checked before any scoring; a bad one exits with code 2 and
names the file and line.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from verifiers.base import Task
from verifiers.pool import VerifierPool
from verifiers.registry import UnknownVerifierError, resolve

EXIT_USAGE = 2


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


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); value is JSON when it parses (`3`, `true`, `"x"`), else the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def read_items(path: str, verifier: str) -> tuple[list[dict[str, Any]], list[tuple[str, Task]]]:
    """The input records and their `(response, Task)` items; InputError names `path:line`."""
    records: list[dict[str, Any]] = []
    items: list[tuple[str, Task]] = []
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
    return records, items


def run_verify(args: argparse.Namespace) -> int:
    try:
        options = dict(parse_option(o) for o in args.option)
        if args.workers < 1 or args.timeout <= 0:
            raise ValueError(f"--workers must be >= 1 and --timeout > 0, got {args.workers} and {args.timeout}")
        resolve(args.verifier)
        records, items = read_items(args.input, args.verifier)
    except (InputError, ValueError, UnknownVerifierError, OSError) as exc:
        print(f"assay verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with VerifierPool(args.workers, args.timeout, options={args.verifier: options}) as pool:
        verdicts = pool.score(items)
    lines = [json.dumps({**rec, "score": v.score, "reason": v.reason}) + "\n" for rec, v in zip(records, verdicts)]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.writelines(lines)
    else:
        sys.stdout.writelines(lines)
    scores = [v.score for v in verdicts if v.score is not None]
    summary = {
        "count": len(verdicts),
        "mean_score": sum(scores) / len(scores) if scores else 0.0,
        "timeouts": sum(v.reason == "timeout" for v in verdicts),
        "errors": sum(v.reason.startswith("verifier error") for v in verdicts),
    }
    print(json.dumps({"summary": summary}), file=sys.stderr)
    return 0


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
        pool = VerifierPool(args.workers, args.timeout, options, max_tasks_per_worker=args.max_tasks_per_worker)
    except (ValueError, UnknownVerifierError) as exc:
        print(f"assay serve-verifiers: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pool:
            try:
                server = serve(args.host, args.port, pool)
            except OSError as exc:
                print(f"assay serve-verifiers: {exc}", file=sys.stderr)
                return EXIT_USAGE
            print(f"serving verifiers on {server.endpoint} with {args.workers} workers", flush=True)
            stop.wait()
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
