"""Contamination check: the longest word n-gram each eval item shares with any training task.

The method of the GPT-3 (Brown et al. 2020, appendix C) and Llama 2 (Touvron et al. 2023, §A.6)
contamination reports, on word tokens: a text is lowercased, every character that is not a letter or
a digit becomes a space, and the rest is split on whitespace (`"Solve 3*x+4=19!"` -> `solve 3 x 4 19`).
Punctuation becomes a separator rather than being deleted so that `12+7` stays two numbers and does
not turn into `127`. For every eval item we report the longest run of consecutive tokens that also
occurs in some training text (and which one), and flag the item when that run is at least `n` tokens
long (13, as GPT-3), or, when `threshold` is given, covers at least that fraction of the item's
tokens: templated math problems are often shorter than 13 words, and `threshold=1.0` flags such an
item when the whole of it occurs in a training text. A task's text is its prompt (chat messages
joined as `role: content` lines); answers and demonstrations are not compared. The price of
stripping punctuation shows on templated math: `9*x - 9 = 9` and `9*x + 9 = 9` are the same tokens,
so with `threshold=1.0` 36 of the 64 held-out `linear_equations` (none of them a training equation)
are flagged against 5,000 training ones. Such sets need exact deduplication (their held-out splits
do it); this check is for natural-language items and longer programs.

How it is computed: token ids, then one pass per length L = 1, 2, ... keeps the positions whose
L-gram occurs on both sides (a 64-bit polynomial rolling hash per position, extended by one token
per pass, intersected with numpy), so the cost is the total length times the longest shared run, not
the number of pairs. Texts are joined with separator ids that differ between the two sides, so no
shared n-gram spans two texts. A hash collision could only overstate an overlap, with probability
about (positions²) / 2⁶⁴ per pass.

`flag_contaminated` is the entry point for the self-play loop (its buffer against the eval set);
`run_cli` is `assay contamination --train TASKS.jsonl --eval EVAL.jsonl [--n 13] [--threshold F]
[--out FILE.json]`, on task files as `task.file` reads them (`engine.tasks.files.read_rows`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.tasks.base import DEFAULT_COLUMNS, prompt_text
from engine.tasks.files import read_rows
from verifiers.base import Task

DEFAULT_N = 13
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the rolling hash (wrapping uint64 arithmetic)


def tokens(text: str) -> list[str]:
    """Lowercased word tokens; every character that is not a letter or digit separates tokens."""
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()


@dataclass(frozen=True)
class Overlap:
    """The longest n-gram an item shares with the other side: its length in tokens (0: none), where it
    starts in the item, and the index of one text on the other side that contains it (-1: none)."""

    length: int
    start: int
    match: int


def longest_shared_ngrams(items: Sequence[Sequence[str]], against: Sequence[Sequence[str]]) -> list[Overlap]:
    """For each token list in `items`, the longest run of tokens that also occurs in some list of `against`."""
    vocab: dict[str, int] = {}
    item_ids, item_doc = _encode(items, vocab, separator=-1)
    other_ids, other_doc = _encode(against, vocab, separator=-2)
    starts = np.cumsum([0] + [len(t) + 1 for t in items], dtype=np.int64)  # item -> its first position
    best_len, best_start, best_match = (np.zeros(len(items), dtype=np.int64) for _ in range(3))
    best_match -= 1
    item_hash, other_hash = np.zeros(len(item_ids), dtype=np.uint64), np.zeros(len(other_ids), dtype=np.uint64)
    item_pos, other_pos = np.arange(len(item_ids)), np.arange(len(other_ids))  # L-grams still shared
    length = 0
    with np.errstate(over="ignore"):  # the hash wraps around mod 2**64 by design
        while len(item_pos) and len(other_pos):
            length += 1  # extend every surviving position's gram by one token
            item_pos = item_pos[item_pos + length - 1 < len(item_ids)]
            other_pos = other_pos[other_pos + length - 1 < len(other_ids)]
            item_hash[item_pos] = item_hash[item_pos] * _BASE + item_ids[item_pos + length - 1]
            other_hash[other_pos] = other_hash[other_pos] * _BASE + other_ids[other_pos + length - 1]
            order = np.argsort(other_hash[other_pos], kind="stable")
            sorted_hashes = other_hash[other_pos[order]]
            at = np.minimum(np.searchsorted(sorted_hashes, item_hash[item_pos]), max(len(order) - 1, 0))
            found = sorted_hashes[at] == item_hash[item_pos] if len(order) else np.zeros(len(item_pos), bool)
            matched = other_pos[order[at[found]]]  # for each shared item position, one other position
            item_pos = item_pos[found]
            other_pos = other_pos[np.isin(other_hash[other_pos], item_hash[item_pos])]
            docs, first = np.unique(item_doc[item_pos], return_index=True)  # one shared position per item
            best_len[docs] = length
            best_start[docs] = item_pos[first] - starts[docs]
            best_match[docs] = other_doc[matched[first]]
    return [Overlap(int(n), int(s), int(m)) for n, s, m in zip(best_len, best_start, best_match)]


@dataclass(frozen=True)
class ItemResult:
    """The contamination verdict of one item (one row of the report)."""

    index: int
    id: str
    tokens: int
    longest: int
    fraction: float
    flagged: bool
    shared: str
    """The shared n-gram, as normalised tokens."""
    match_id: str
    """The id of a text on the other side that contains it ("" when nothing is shared)."""


def check(
    items: Sequence[str], against: Sequence[str], n: int = DEFAULT_N, threshold: float | None = None,
    item_ids: Sequence[str] | None = None, against_ids: Sequence[str] | None = None,
) -> list[ItemResult]:
    """The verdict for each text of `items` against the texts of `against` (see the module docstring)."""
    if n < 1:
        raise ValueError(f"contamination: n must be >= 1, got {n}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"contamination: threshold must be in (0, 1], got {threshold}")
    item_ids = list(item_ids) if item_ids is not None else [str(i) for i in range(len(items))]
    against_ids = list(against_ids) if against_ids is not None else [str(i) for i in range(len(against))]
    item_tokens = [tokens(t) for t in items]
    overlaps = longest_shared_ngrams(item_tokens, [tokens(t) for t in against])
    results = []
    for i, (toks, o) in enumerate(zip(item_tokens, overlaps)):
        fraction = o.length / len(toks) if toks else 0.0
        flagged = o.length >= n or (threshold is not None and o.length > 0 and fraction >= threshold)
        results.append(ItemResult(
            index=i, id=item_ids[i], tokens=len(toks), longest=o.length, fraction=round(fraction, 4),
            flagged=flagged, shared=" ".join(toks[o.start:o.start + o.length]),
            match_id=against_ids[o.match] if o.match >= 0 else "",
        ))
    return results


def flag_contaminated(
    tasks: Sequence[Task], eval_tasks: Sequence[Task], n: int = DEFAULT_N, threshold: float | None = None
) -> list[int]:
    """Indices of `tasks` (a self-play buffer) that share an n-gram of `n` or more tokens (or `threshold`
    of their tokens) with any of `eval_tasks`; drop these before training on the buffer."""
    results = check([prompt_text(t.prompt) for t in tasks], [prompt_text(t.prompt) for t in eval_tasks], n, threshold)
    return [r.index for r in results if r.flagged]


def _encode(texts: Sequence[Sequence[str]], vocab: dict[str, int], separator: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all texts, each followed by `separator` (as uint64), and the text index of each position."""
    ids: list[int] = []
    doc: list[int] = []
    for i, toks in enumerate(texts):
        ids += [vocab.setdefault(t, len(vocab) + 1) for t in toks] + [separator]
        doc += [i] * (len(toks) + 1)
    return np.array(ids, dtype=np.int64).astype(np.uint64), np.array(doc, dtype=np.int64)


def add_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of `assay contamination`."""
    parser.add_argument("--train", nargs="+", required=True, metavar="TASKS",
                        help="training task files (.jsonl or .parquet, as task.file reads them)")
    parser.add_argument("--eval", required=True, metavar="EVAL", help="eval task file to check")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"flag a shared n-gram this long (default {DEFAULT_N})")
    parser.add_argument("--threshold", type=float, default=None,
                        help="also flag an item when the shared n-gram covers this fraction of its tokens (0-1]")
    parser.add_argument("--columns", nargs="*", default=[], metavar="FIELD=COLUMN",
                        help="column names as task.file.columns, e.g. prompt=question answer=solution id=qid")
    parser.add_argument("--format", default="auto", choices=("auto", "jsonl", "parquet"))
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write per-item results as JSON")


def run_cli(args: argparse.Namespace) -> int:
    """`assay contamination`: print a table of every eval item and write `--out`; 2 on bad input."""
    try:
        columns = {**DEFAULT_COLUMNS, "response": "", **dict(_pair(c) for c in args.columns)}
        train = [row for path in args.train for row in read_rows(path, columns, args.format)]
        held = read_rows(args.eval, columns, args.format)
        results = check([prompt_text(r.prompt) for r in held], [prompt_text(r.prompt) for r in train], args.n,
                        args.threshold, [r.id for r in held], [r.id for r in train])
    except ValueError as err:  # TaskFileError included
        print(f"assay contamination: {err}", file=sys.stderr)
        return 2
    print(f"{'item':>5} {'id':<24} {'tokens':>6} {'longest':>7} {'flag':>4}  {'train id':<24} shared n-gram")
    for r in results:
        print(f"{r.index:>5} {r.id[-24:]:<24} {r.tokens:>6} {r.longest:>7} {'yes' if r.flagged else '':>4}  "
              f"{r.match_id[-24:]:<24} {r.shared[:60]}")
    flagged = sum(r.flagged for r in results)
    rule = f"longest shared n-gram >= {args.n} tokens" + (
        f" or >= {args.threshold:.0%} of the item" if args.threshold is not None else "")
    print(f"[assay] {flagged} of {len(results)} eval items flagged ({rule}); {len(train)} training tasks")
    if args.out:
        report = {"n": args.n, "threshold": args.threshold, "train": list(args.train), "eval": args.eval,
                  "train_tasks": len(train), "flagged": flagged, "items": [asdict(r) for r in results]}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"[assay] per-item results: {args.out}")
    return 0


def _pair(text: str) -> tuple[str, str]:
    field_name, sep, column = text.partition("=")
    if not sep or field_name not in DEFAULT_COLUMNS:
        raise ValueError(f"--columns {text!r}: expected FIELD=COLUMN (fields: {', '.join(DEFAULT_COLUMNS)})")
    return field_name, column
