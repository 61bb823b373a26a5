"""Proposer-solver self-play on code deduction (`rl.collector=selfplay`): the policy writes its own tasks.

Absolute Zero's deduction loop (Zhao et al. 2025, https://arxiv.org/abs/2505.03335) on the program
style of `engine.tasks.code_reasoning` (`def f(xs)` over a list of integers). One step:

1. Proposer: `selfplay.proposer_prompts` prompts (a fixed instruction and `selfplay.examples` buffer
   tasks, drawn with a seed of the step), each sampled G times. A proposal is a ```python block defining
   `f(xs)` and an `Input: [...]` line.
2. Validation (`check_proposals`, in the sandbox through `code_output`'s harness): it parses, defines
   `f` with one argument, the input is a list of integers; it is neither an exact duplicate (same program
   after `ast.unparse`, same input) nor a near-duplicate (Jaccard similarity of token-trigram sets of
   program and input >= `selfplay.near_duplicate`) of a buffer task or of an earlier proposal of the
   step; it returns within `selfplay.timeout_s` without raising, four calls (twice in each of two
   sandbox processes, so unseeded `random`, `time`, `id` and string hashing show) agree, and the output's
   repr is at most `selfplay.max_output_chars` long. A new task sharing a `selfplay.contamination_n`-gram
   with an eval prompt (`engine.contamination`) is dropped too (`contaminated`).
3. Solver: every valid proposal becomes a deduction task (code_reasoning's prompt, the executed output as
   reference, verifier `code_output`) answered G times; the step's other solver groups replay buffer tasks.
4. Rewards: solver groups get the verifier's scores; a proposer sample gets `selfplay.invalid_reward`
   when invalid, else the learnability of its task, `1 - solve_rate` when `0 < solve_rate < 1`, else 0.

The step's groups, in this order: the proposer groups, the solver groups of this step's proposals, the
replayed buffer tasks; cut to `rl.prompts_per_step` groups and then to whole minibatches (dropping from
the end). Where it departs from the paper: one task type (deduction) instead of three, no reference
programs beyond code_reasoning's, and GRPO-style groups (G proposals of one prompt) rather than the
paper's task-relative REINFORCE++ baselines.

The buffer is the collector's state (`SelfPlayCollector.state_dict`, which every checkpoint records next
to the task stream's position): it starts with `selfplay.seed_tasks` deduction tasks of `task.source` and
grows with every valid proposal; a resumed run continues from the checkpoint's buffer (exact resume).

`SelfPlaySource` (`task.source=engine.selfplay:SelfPlaySource`) is code_reasoning plus proposer-format
demonstrations, for the pretrain and SFT stages: the proposer format has to be learnt somewhere.
"""

from __future__ import annotations

import ast
import json
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.collector_base import (
    CollectorContext,
    rollout_metrics,
    sample_seed,
    score,
    shaped,
    whole_minibatch_groups,
)
from engine.contamination import flag_contaminated
from engine.scoring import step_verifier_metrics
from engine.tasks.base import TaskConfig
from engine.tasks.code_reasoning import ENTRY_POINT, CodeReasoningSource, deduction_prompt
from rollout.types import Response
from rollout.worker import sampling_from_config
from verifiers.base import Task
from verifiers.code_output import SandboxRunFailed, run_calls
from verifiers.sandbox import Limits, resolve_isolation

INSTRUCTION = "Write a new program f(xs) and an input list xs, unlike these examples.\n"
REASONS = ("format", "syntax", "no_f", "input", "duplicate", "near_duplicate", "crash", "timeout",
           "nondeterministic", "long_output", "contaminated")
MAX_INPUT_CHARS = 60
NGRAM = 3  # near-duplicate measure: Jaccard similarity of token-trigram sets
_TOKEN = re.compile(r"\w+|[^\w\s]")
_PROPOSAL = re.compile(r"```(?:python)?\n(.*?)\n?```\s*Input:[ \t]*([^\n]*)", re.DOTALL)


# ---------------------------------------------------------------------- tasks and the buffer


@dataclass(frozen=True)
class CodeTask:
    """A validated deduction task: `program` normalised by `ast.unparse`, `argument` and `output` reprs."""

    program: str
    argument: str
    output: str

    def prompt(self) -> str:
        return deduction_prompt(self.program, self.argument)

    def shown(self) -> str:
        """How a proposer prompt shows it, and how a proposal writes it."""
        return f"```python\n{self.program}\n```\nInput: {self.argument}\n"

    def task(self, task_id: str) -> Task:
        return Task(id=task_id, prompt=self.prompt(), reference={"mode": "deduction", "output": self.output},
                    verifier="code_output", meta={"mode": "deduction", "program": self.program,
                                                  "inputs": [self.argument], "outputs": [self.output],
                                                  "response": f"\\boxed{{{self.output}}}"})


def difficulty(program: str) -> int:
    """AST nodes of a program (the size measure of `selfplay/difficulty`)."""
    return sum(1 for _ in ast.walk(ast.parse(program)))


def trigrams(program: str, argument: str) -> frozenset[tuple[str, ...]]:
    toks = _TOKEN.findall(f"{program}\n{argument}")
    return frozenset(tuple(toks[i:i + NGRAM]) for i in range(max(len(toks) - NGRAM + 1, 1)))


def jaccard(a: frozenset[Any], b: frozenset[Any]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class TaskBuffer:
    """Valid tasks, oldest first, at most `size`; finds exact and near duplicates (module docstring)."""

    def __init__(self, size: int, near: float) -> None:
        self.size, self.near = size, near
        self.tasks: list[CodeTask] = []
        self._grams: list[frozenset[tuple[str, ...]]] = []

    def __len__(self) -> int:
        return len(self.tasks)

    def duplicate(self, candidate: CodeTask, also: Sequence[CodeTask] = ()) -> str:
        """`duplicate`, `near_duplicate` or "" for a task against the buffer and the tasks `also`."""
        others = [*self.tasks, *also]
        if any((t.program, t.argument) == (candidate.program, candidate.argument) for t in others):
            return "duplicate"
        grams = trigrams(candidate.program, candidate.argument)
        known = [*self._grams, *(trigrams(t.program, t.argument) for t in also)]
        return "near_duplicate" if any(jaccard(grams, g) >= self.near for g in known) else ""

    def add(self, task: CodeTask) -> None:
        self.tasks.append(task)
        self._grams.append(trigrams(task.program, task.argument))
        del self.tasks[:-self.size], self._grams[:-self.size]

    def sample(self, rng: random.Random, k: int) -> list[CodeTask]:
        return rng.sample(self.tasks, min(k, len(self.tasks)))


def proposer_prompt(examples: Sequence[CodeTask]) -> str:
    return INSTRUCTION + "".join(e.shown() for e in examples) + "New:\n"


# ---------------------------------------------------------------------- validation


def parse_proposal(text: str) -> tuple[CodeTask | None, str]:
    """The proposal's program (normalised) and input, output unknown yet; or None and the reason."""
    found = _PROPOSAL.search(text)
    if found is None:
        return None, "format"
    source, argument = found.group(1), found.group(2).strip()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None, "syntax"
    if not any(isinstance(node, ast.FunctionDef) and node.name == ENTRY_POINT and len(node.args.args) == 1
               for node in tree.body):
        return None, "no_f"
    try:
        value = ast.literal_eval(argument)
    except Exception:  # noqa: BLE001 - any malformed literal
        return None, "input"
    if (not isinstance(value, list) or not all(type(v) is int for v in value)
            or len(repr(value)) > MAX_INPUT_CHARS):
        return None, "input"
    try:
        program = ast.unparse(tree)
    except RecursionError:
        return None, "syntax"
    return CodeTask(program, repr(value), ""), ""


def check_proposals(texts: Sequence[str], buffer: TaskBuffer, limits: Limits, isolation: str,
                    max_output_chars: int) -> list[tuple[CodeTask | None, str]]:
    """For each proposal text: the task with its output and "", or None and why it is invalid (`REASONS`)."""
    checked: list[tuple[CodeTask | None, str]] = []
    accepted: list[CodeTask] = []  # earlier proposals of this batch that passed the static checks
    for text in texts:
        task, reason = parse_proposal(text)
        if task is not None:
            reason = buffer.duplicate(task, accepted)
            if not reason:
                accepted.append(task)
        checked.append((task, reason))
    runs = dict(zip(accepted, _execute(accepted, limits, isolation)))
    out: list[tuple[CodeTask | None, str]] = []
    for task, reason in checked:
        if reason or task is None:
            out.append((None, reason))
            continue
        outputs, reason = runs[task]
        if not reason and len(set(outputs)) > 1:
            reason = "nondeterministic"
        if not reason and len(outputs[0]) > max_output_chars:
            reason = "long_output"
        out.append((None, reason) if reason else (CodeTask(task.program, task.argument, outputs[0]), ""))
    return out


def _execute(tasks: list[CodeTask], limits: Limits, isolation: str) -> list[tuple[list[str], str]]:
    """Each task's outputs of four calls (two sandbox runs, two calls each) and "", or [] and `crash` or
    `timeout`. A run that dies (one task loops or kills the interpreter) is retried task by task."""
    if not tasks:
        return []
    calls = [(t.program, ENTRY_POINT, t.argument) for t in tasks for _ in range(2)]
    try:
        runs = [run_calls(calls, limits, isolation) for _ in range(2)]
    except SandboxRunFailed as failed:
        if len(tasks) > 1:
            return [result for t in tasks for result in _execute([t], limits, isolation)]
        return [([], "timeout" if failed.result.timed_out else "crash")]
    results: list[tuple[list[str], str]] = []
    for i in range(len(tasks)):
        calls_of_task = [run[j] for run in runs for j in (2 * i, 2 * i + 1)]
        if not all(r.ok for r in calls_of_task):
            results.append(([], "crash"))
        else:
            results.append(([r.text for r in calls_of_task], ""))
    return results


def learnability(solve_rates: torch.Tensor) -> torch.Tensor:
    """Absolute Zero's proposer reward: `1 - r` where `0 < r < 1`, else 0 (NaN stays NaN: not judged)."""
    mixed = (solve_rates > 0) & (solve_rates < 1)
    return torch.where(mixed | solve_rates.isnan(), 1 - solve_rates, torch.zeros_like(solve_rates))


# ---------------------------------------------------------------------- the collector


class SelfPlayCollector:
    """`rl.collector=selfplay`: each step's proposer and solver groups (module docstring). Its state is
    the task buffer, seeded from the task source at the first step unless a checkpoint's was loaded."""

    def __init__(self, ctx: CollectorContext) -> None:
        sp = ctx.cfg.selfplay
        if not 0 < sp.proposer_prompts < ctx.cfg.rl.prompts_per_step:
            raise ValueError(f"selfplay.proposer_prompts={sp.proposer_prompts}: expected 1 .. rl.prompts_per_step - 1 "
                             f"= {ctx.cfg.rl.prompts_per_step - 1} (the other groups of a step are solver groups)")
        self.ctx = ctx
        self.buffer = TaskBuffer(sp.buffer_size, sp.near_duplicate)
        self.started = False  # the buffer was seeded or loaded
        self.limits = Limits(timeout_s=sp.timeout_s, memory_mb=256, max_output_bytes=1 << 16)
        self.isolation = resolve_isolation(ctx.cfg.task.code_reasoning.isolation)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": [asdict(t) for t in self.buffer.tasks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sp = self.ctx.cfg.selfplay
        self.buffer = TaskBuffer(sp.buffer_size, sp.near_duplicate)
        for row in state["buffer"]:
            self.buffer.add(CodeTask(**row))
        self.started = True

    def finish(self, run_dir: Path) -> None:
        """Once the stage's last step is logged: the final `selfplay.png`. (`collect` refreshes the plot
        every step, but the last step's metrics and final evaluation come after.)"""
        write_plot(run_dir)

    def add(self, tasks: list[CodeTask], n: int) -> list[bool]:
        """Put `tasks` into the buffer unless they share an n-gram of `n` tokens with an eval prompt;
        returns which were flagged (and dropped)."""
        flagged = set(flag_contaminated([t.task("") for t in tasks], self.ctx.eval_tasks, n)) if tasks else set()
        for i, task in enumerate(tasks):
            if i not in flagged:
                self.buffer.add(task)
        return [i in flagged for i in range(len(tasks))]

    def collect(self, step: int) -> tuple[list[Response], torch.Tensor, dict[str, float]]:
        """One self-play step's groups (proposer groups, then solver groups), rewards `(P, G)` and metrics."""
        cfg, rollout, buffer = self.ctx.cfg, self.ctx.rollout, self.buffer
        sp, n = cfg.selfplay, cfg.rollout.n
        if not self.started:
            self.seed_buffer(step)
        t0 = time.perf_counter()
        rngs = [random.Random(f"selfplay:{cfg.seed}:{step}:{i}") for i in range(sp.proposer_prompts + 1)]
        prompts = [Task(id=f"selfplay-propose-{step}-{i}", prompt=proposer_prompt(buffer.sample(rng, sp.examples)),
                        reference=None, verifier="code_output", meta={"mode": "proposal"})
                   for i, rng in enumerate(rngs[:-1])]
        proposals = rollout.generate(prompts, n, sampling_from_config(cfg.rollout, seed=sample_seed(cfg.seed, step)))
        t1 = time.perf_counter()
        checked = check_proposals([r.text for r in proposals], buffer, self.limits, self.isolation,
                                  sp.max_output_chars)
        valid = [(i, task) for i, (task, _) in enumerate(checked) if task is not None]
        flagged = self.add([task for _, task in valid], sp.contamination_n)
        reasons = [reason for _, reason in checked]
        for (i, _), dropped in zip(valid, flagged):
            if dropped:
                reasons[i] = "contaminated"
        fresh = [(i, task) for (i, task), dropped in zip(valid, flagged) if not dropped]
        t2 = time.perf_counter()

        replays = rngs[-1].sample(buffer.tasks[:len(buffer) - len(fresh)],
                                  max(0, min(cfg.rl.prompts_per_step - sp.proposer_prompts - len(fresh),
                                             len(buffer) - len(fresh))))
        solver_tasks = [task.task(f"selfplay-solve-{step}-{j}") for j, task in enumerate([t for _, t in fresh] + replays)]
        answers = rollout.generate(solver_tasks, n, sampling_from_config(cfg.rollout, seed=sample_seed(cfg.seed, step, 1)))
        t3 = time.perf_counter()
        solved, judged = score(self.ctx.scorers, solver_tasks, answers, n)  # (S, G), NaN: not judged (an infra error)
        rates = solved.nanmean(1)  # (S,)
        proposer = torch.full((len(proposals),), sp.invalid_reward)  # (P_prop * G,)
        for j, (i, _) in enumerate(fresh):
            proposer[i] = learnability(rates[j])
        rewards = torch.cat([shaped(proposer.view(len(prompts), n), proposals, cfg), shaped(solved, answers, cfg)])
        responses = proposals + answers
        metrics = _metrics(reasons, [t for _, t in fresh], proposer, rates, len(fresh), buffer, responses, rewards, n,
                           len(prompts))
        metrics.update({"perf/rollout_s": (t1 - t0) + (t3 - t2), "perf/selfplay_check_s": t2 - t1,
                        "perf/verify_s": time.perf_counter() - t3})
        metrics.update(step_verifier_metrics(judged, step + 1, cfg.verifier.max_infra_error_frac))  # may stop the run

        usable = whole_minibatch_groups(min(len(prompts) + len(solver_tasks), cfg.rl.prompts_per_step), n,
                                        cfg.learner.batch_size)
        metrics["selfplay/trained_groups"] = float(usable)
        write_plot(self.ctx.run_dir)
        return responses[:usable * n], rewards[:usable], metrics

    def seed_buffer(self, step: int) -> None:
        """Start the buffer with deduction tasks of the task source (at step `step` > 0: a run resumed from
        a checkpoint without the collector's state, which says so)."""
        cfg, sp = self.ctx.cfg, self.ctx.cfg.selfplay
        if step:
            print(f"[assay] selfplay: the checkpoint resumed at step {step} holds no task buffer; starting a fresh one")
        seeds: list[CodeTask] = []
        for _ in range(8):  # a source that mixes in other tasks (SelfPlaySource) needs more draws
            seeds += [_code_task(t) for t in self.ctx.source.sample(sp.seed_tasks) if t.meta.get("mode") == "deduction"]
            if len(seeds) >= sp.seed_tasks:
                break
        if not seeds:
            raise ValueError(f"rl.collector=selfplay: task.source={cfg.task.source!r} yielded no code_reasoning "
                             "deduction tasks to seed the buffer (use code_reasoning with 'deduction' in its modes)")
        seeds = seeds[:sp.seed_tasks]
        self.add([t for i, t in enumerate(seeds) if not self.buffer.duplicate(t, seeds[:i])], sp.contamination_n)
        self.started = True


def _metrics(reasons: list[str], fresh: list[CodeTask], proposer: torch.Tensor, rates: torch.Tensor, n_fresh: int,
             buffer: TaskBuffer, responses: list[Response], rewards: torch.Tensor, n: int,
             proposer_groups: int) -> dict[str, float]:
    """The step's `selfplay/*` metrics, plus the rollout metrics of its solver groups."""
    split = proposer_groups * n
    metrics = rollout_metrics(responses[split:], rewards[proposer_groups:]) if len(responses) > split else {}
    metrics.update({f"selfplay/invalid_{r}": float(reasons.count(r)) for r in REASONS})
    metrics.update({"selfplay/valid_frac": sum(not r for r in reasons) / len(reasons),
                    "selfplay/contaminated_dropped": float(reasons.count("contaminated")),
                    "selfplay/proposer_reward": float(proposer.nanmean()), "selfplay/buffer": float(len(buffer)),
                    "selfplay/buffer_difficulty": sum(map(difficulty, (t.program for t in buffer.tasks)))
                    / max(len(buffer), 1)})
    if fresh:  # absent in a step without valid proposals (a gap in the curves, not a zero)
        metrics.update({"selfplay/solve_rate": float(rates[:n_fresh].nanmean()),
                        "selfplay/learnability": float(learnability(rates[:n_fresh]).nanmean()),
                        "selfplay/difficulty": sum(difficulty(t.program) for t in fresh) / len(fresh)})
    if len(rates) > n_fresh:
        metrics["selfplay/replay_solve_rate"] = float(rates[n_fresh:].nanmean())
    return metrics


# ---------------------------------------------------------------------- the report


PLOT_KEYS = (("eval/accuracy", "solver held-out accuracy (greedy)"), ("selfplay/valid_frac", "proposer validity rate"),
             ("selfplay/difficulty", "mean task difficulty (AST nodes)"))


def write_plot(run_dir: Path) -> Path | None:
    """`selfplay.png` in `run_dir`: solver held-out accuracy, proposer validity and mean difficulty of
    valid proposals (and of the buffer) over RL steps, from `metrics.jsonl`. None without records."""
    records = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:  # the loop may be appending the line being read
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, PLOT_KEYS):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        if key == "selfplay/difficulty":
            buffer = [(r["step"], r["selfplay/buffer_difficulty"]) for r in records if "selfplay/buffer_difficulty" in r]
            if buffer:
                ax.plot(*zip(*buffer), linestyle="--", label="buffer mean")
        else:
            ax.set_ylim(0, 1.02)
        ax.set(title=title, xlabel="RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = run_dir / "selfplay.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------- the pretrain/SFT source


DEMO_FRACTION = 0.5  # of SelfPlaySource's tasks, proposer demonstrations (the rest: deduction tasks)
DEMO_EXAMPLES = (1, 2)  # buffer tasks a demonstration's prompt shows, drawn uniformly


class SelfPlaySource:
    """`task.code_reasoning`'s tasks, half of them replaced by proposer demonstrations: a proposer prompt
    showing 1-2 code_reasoning problems (program and first input) and, as the response, another one.
    Its held-out set is code_reasoning's; its stream position is code_reasoning's plus its own index."""

    def __init__(self, base: CodeReasoningSource, corpus_base: CodeReasoningSource, seed: int) -> None:
        self.base, self.corpus_base, self.seed = base, corpus_base, seed
        self._index = 0

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> SelfPlaySource:
        return cls(CodeReasoningSource.from_config(cfg, seed), CodeReasoningSource.from_config(cfg, seed + 104_729), seed)

    def sample(self, n: int) -> list[Task]:
        start, self._index = self._index, self._index + n
        return self._mixed(self.base, range(start, start + n), "train")

    def eval_tasks(self, n: int) -> list[Task]:
        return self.base.eval_tasks(n)

    def corpus(self, n_docs: int) -> Iterator[str]:
        for start in range(0, n_docs, 256):
            for task in self._mixed(self.corpus_base, range(start, min(start + 256, n_docs)), "corpus"):
                yield f"{task.prompt}{task.meta['response']}"

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self._index = int(state["index"])

    def _mixed(self, base: CodeReasoningSource, indices: range, stream: str) -> list[Task]:
        """Task i of the stream: with its own seeded draw, a demonstration (k + 1 base tasks) or a base task."""
        plans = []
        for i in indices:
            rng = random.Random(f"selfplay-demo:{self.seed}:{stream}:{i}")
            plans.append(rng.choice(DEMO_EXAMPLES) if rng.random() < DEMO_FRACTION else 0)
        drawn = iter(base.sample(sum(k + 1 if k else 1 for k in plans)))
        tasks = []
        for i, k in zip(indices, plans):
            if not k:
                tasks.append(next(drawn))
                continue
            shown = [_code_task(next(drawn)) for _ in range(k + 1)]
            tasks.append(Task(id=f"selfplay-demo-{self.seed}-{stream}-{i}", prompt=proposer_prompt(shown[:-1]),
                              reference=None, verifier="code_output",
                              meta={"mode": "proposal", "response": shown[-1].shown()}))
        return tasks


def _code_task(task: Task) -> CodeTask:
    """A code_reasoning task's program (normalised as proposals are), first input and first output."""
    return CodeTask(ast.unparse(ast.parse(task.meta["program"])), task.meta["inputs"][0], task.meta["outputs"][0])

