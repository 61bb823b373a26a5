"""Built-in code-reasoning tasks in Absolute Zero's three modes, on small generated Python programs.

Each problem is a function `def f(xs):` of a list of small non-negative integers, built from seeded
templates: straight-line statements (`acc += sum(xs)`, `xs = sorted(xs)`, `out.append(x * 3)`), loops
over the list and conditions, `statements` statements in all with blocks nested `depth` deep (the
difficulty knobs). By construction a program ends (loops run over finite lists; no while, no
recursion) and does not raise (no division, no indexing, constant moduli >= 2). The modes (knob
`modes`) follow Absolute Zero (Zhao et al. 2025, https://arxiv.org/abs/2505.03335):

- deduction: program + input -> the output (`code_output`: the value, in `\\boxed{}`);
- abduction: program + output -> an input that gives it (`code_output` runs the program on the answer);
- induction: `examples` input/output pairs -> a program (`unit_tests`, HumanEval style, on those pairs
  and `hidden_tests` more that the prompt never shows, so tabulating the examples fails).
Where it departs from the paper: the programs come from templates, not from a proposer model, and
abduction/deduction answers are compared by `repr` (type included) rather than by `==`.

Ground truth is what the programs do when executed in the sandbox (`verifiers.code_output.run_calls`,
the harness the verifier uses too), never a re-implementation: one sandbox run executes every call a
batch of tasks needs (a `sample`, the held-out set, a chunk of corpus), and results are cached by
(program, input). A drawn problem is redrawn when its output does not depend on the input (equal on
the task's input and two probe inputs, or on all induction inputs) or is longer than 200 characters.

Reproducibility as in `engine.tasks.arithmetic`: training task `i` is drawn from its own generator
seeded with `(seed, i)` (redraws continue that generator), so the stream position is one integer. The
held-out problems are drawn from a generator seeded only by the knobs, and a training or corpus draw
whose program is a held-out program (in any mode) is redrawn.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from engine.tasks.base import CODE_MODES as MODES
from engine.tasks.base import SeededStream, TaskConfig
from verifiers.base import Task
from verifiers.code_output import run_calls
from verifiers.sandbox import Limits, resolve_isolation

ENTRY_POINT = "f"
MAX_OUTPUT_CHARS = 200
PROBES = 2  # extra inputs that show a deduction/abduction program's output depends on its input
MAX_CANDIDATES = 256  # candidates drawn for one task before the knobs are declared too narrow
_LOOP_VARS = "xyzw"
_CORPUS_CHUNK = 256
_CACHE_LIMIT = 100_000
_LIMITS = Limits(timeout_s=60.0, memory_mb=512, max_output_bytes=1 << 24)


@dataclass(frozen=True)
class Problem:
    """A drawn problem before execution: `inputs` are argument reprs (the task's input first, then probes;
    or, for induction, the shown examples then the hidden tests)."""

    mode: str
    program: str
    inputs: tuple[str, ...]


class CodeReasoningSource(SeededStream):
    """Seeded stream of code-reasoning tasks with a fixed held-out set (see the module docstring)."""

    def __init__(
        self, modes: Sequence[str] = MODES, statements: int = 3, depth: int = 1, list_len: int = 5,
        max_value: int = 9, examples: int = 3, hidden_tests: int = 3, seed: int = 0, eval_size: int = 64,
        isolation: str = "auto",
    ) -> None:
        unknown = sorted(set(modes) - set(MODES))
        if not modes or unknown:
            raise ValueError(f"task.code_reasoning.modes={list(modes)!r}: expected a non-empty subset of {list(MODES)}")
        if statements < 1:
            raise ValueError(f"task.code_reasoning.statements must be >= 1, got {statements}")
        if not 0 <= depth <= min(len(_LOOP_VARS), statements - 1):
            raise ValueError(f"task.code_reasoning.depth={depth}: expected 0 .. {len(_LOOP_VARS)} and at most "
                             f"statements - 1 = {statements - 1} (each block holds at least one statement)")
        if list_len < 1 or max_value < 1:
            raise ValueError(f"task.code_reasoning.list_len ({list_len}) and max_value ({max_value}) must be >= 1")
        if examples < 1 or hidden_tests < 0:
            raise ValueError(f"task.code_reasoning.examples ({examples}) must be >= 1 and hidden_tests "
                             f"({hidden_tests}) >= 0")
        inputs = sum((max_value + 1) ** n for n in range(1, list_len + 1))
        if inputs < 2 * max(examples + hidden_tests, 1 + PROBES):
            raise ValueError(f"task.code_reasoning: list_len={list_len} and max_value={max_value} allow only "
                             f"{inputs} inputs, too few for examples + hidden_tests = {examples + hidden_tests}")
        self.modes = tuple(m for m in MODES if m in modes)
        self.statements, self.depth = statements, depth
        self.list_len, self.max_value = list_len, max_value
        self.examples, self.hidden_tests = examples, hidden_tests
        self.seed = seed
        self.eval_size = eval_size
        self.isolation = resolve_isolation(isolation)
        self._cache: dict[tuple[str, str], str | None] = {}  # (program, input) -> output repr, None: raised
        self._eval = self._held_out()
        self._held = {problem.program for problem, _ in self._eval}
        self._index = 0  # SeededStream: the stream position

    @classmethod
    def from_config(cls, cfg: TaskConfig, seed: int) -> CodeReasoningSource:
        c = cfg.code_reasoning
        return cls(list(c.modes), c.statements, c.depth, c.list_len, c.max_value, c.examples, c.hidden_tests,
                   seed=seed, eval_size=cfg.eval_size, isolation=c.isolation)

    def sample(self, n: int) -> list[Task]:
        indices = self._advance(n)
        solved = self._solve([f"train:{i}" for i in indices])
        return [self._task(f"code_reasoning-{self.seed}-{i}", *s) for i, s in zip(indices, solved)]

    def eval_tasks(self, n: int) -> list[Task]:
        self._check_eval_size(n)
        return [self._task(f"code_reasoning-eval-{i}", *s) for i, s in enumerate(self._eval[:n])]

    def corpus(self, n_docs: int) -> Iterator[str]:
        for start in range(0, n_docs, _CORPUS_CHUNK):
            keys = [f"corpus:{i}" for i in range(start, min(start + _CORPUS_CHUNK, n_docs))]
            for problem, outputs in self._solve(keys):
                task = self._task("", problem, outputs)
                yield f"{task.prompt}{task.meta['response']}"

    # ------------------------------------------------------------------ drawing and executing

    def _draw(self, rng: random.Random) -> Problem:
        mode = rng.choice(self.modes)
        program = random_program(rng, self.statements, self.depth)
        count = self.examples + self.hidden_tests if mode == "induction" else 1 + PROBES
        inputs: dict[str, None] = {}
        while len(inputs) < count:  # terminates: the knobs allow at least twice as many inputs
            size = rng.randint(1, self.list_len)
            inputs.setdefault(repr([rng.randint(0, self.max_value) for _ in range(size)]))
        return Problem(mode, program, tuple(inputs))

    def _solve(self, keys: list[str]) -> list[tuple[Problem, tuple[str, ...]]]:
        """The first acceptable problem of each key's own generator, with its outputs; one sandbox run per round."""
        rngs = {key: random.Random(f"code_reasoning:{self.seed}:{key}") for key in keys}
        done: dict[str, tuple[Problem, tuple[str, ...]]] = {}
        per_key, drawn = 2, 0
        while len(done) < len(keys):
            if drawn >= MAX_CANDIDATES:
                raise ValueError(self._too_narrow(f"no acceptable problem in {drawn} draws for {len(keys) - len(done)} tasks"))
            pending = [k for k in keys if k not in done]
            drafts = {k: [p for p in (self._draw(rngs[k]) for _ in range(per_key)) if p.program not in self._held]
                      for k in pending}
            outputs = self._execute([p for ps in drafts.values() for p in ps])
            for key, problems in drafts.items():
                found = next(((p, outputs[p]) for p in problems if p in outputs), None)
                if found:
                    done[key] = found
            drawn, per_key = drawn + per_key, min(2 * per_key, 32)
        return [done[k] for k in keys]

    def _held_out(self) -> list[tuple[Problem, tuple[str, ...]]]:
        knobs = (self.modes, self.statements, self.depth, self.list_len, self.max_value, self.examples, self.hidden_tests)
        rng = random.Random(f"code_reasoning-eval:{knobs}")
        chosen: dict[str, tuple[Problem, tuple[str, ...]]] = {}  # program -> problem, outputs
        idle = 0  # rounds in a row that found no new program: the knobs' programs are exhausted
        while len(chosen) < self.eval_size and idle < 3:
            drafts = [self._draw(rng) for _ in range(2 * (self.eval_size - len(chosen)) + 8)]
            outputs = self._execute(drafts)
            before = len(chosen)
            for problem in drafts:
                if len(chosen) < self.eval_size and problem in outputs:
                    chosen.setdefault(problem.program, (problem, outputs[problem]))
            idle = 0 if len(chosen) > before else idle + 1
        if len(chosen) < self.eval_size:
            raise ValueError(self._too_narrow(f"only {len(chosen)} distinct held-out programs for "
                                              f"task.eval_size={self.eval_size}"))
        return list(chosen.values())

    def _execute(self, problems: list[Problem]) -> dict[Problem, tuple[str, ...]]:
        """The outputs of each accepted problem; a rejected one (it raises, is constant, or too long) is left out."""
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        calls = list(dict.fromkeys((p.program, x) for p in problems for x in p.inputs
                                   if (p.program, x) not in self._cache))
        results = run_calls([(program, ENTRY_POINT, x) for program, x in calls], _LIMITS, self.isolation)
        for call, result in zip(calls, results):
            self._cache[call] = result.text if result.ok else None
        accepted: dict[Problem, tuple[str, ...]] = {}
        for p in problems:
            outputs = [self._cache[(p.program, x)] for x in p.inputs]
            texts = tuple(o for o in outputs if o is not None and len(o) <= MAX_OUTPUT_CHARS)
            if len(texts) == len(outputs) and len(set(texts)) > 1:
                accepted[p] = texts
        return accepted

    def _too_narrow(self, what: str) -> str:
        return (f"task.code_reasoning: {what} (statements={self.statements}, depth={self.depth}, "
                f"list_len={self.list_len}, max_value={self.max_value}); raise statements or depth, "
                f"or lower task.eval_size")

    # ------------------------------------------------------------------ tasks

    def _task(self, task_id: str, problem: Problem, outputs: tuple[str, ...]) -> Task:
        program, mode = problem.program, problem.mode
        meta = {"mode": mode, "program": program, "inputs": list(problem.inputs), "outputs": list(outputs)}
        shown = f"```python\n{program}\n```\n"
        if mode == "deduction":
            prompt = deduction_prompt(program, problem.inputs[0])
            reference: dict[str, str] = {"mode": "deduction", "output": outputs[0]}
            response, verifier = f"\\boxed{{{outputs[0]}}}", "code_output"
        elif mode == "abduction":
            prompt = (f"{shown}Give a list xs for which {ENTRY_POINT}(xs) returns {outputs[0]}. "
                      "Put it in \\boxed{}.\n")
            reference = {"mode": "abduction", "program": program, "entry_point": ENTRY_POINT, "output": outputs[0]}
            response, verifier = f"\\boxed{{{problem.inputs[0]}}}", "code_output"
        else:
            pairs = "".join(f"{ENTRY_POINT}({x}) == {y}\n" for x, y in zip(problem.inputs[:self.examples], outputs))
            prompt = (f"Write a Python function {ENTRY_POINT}(xs) of a list of integers xs such that\n{pairs}"
                      "Put it in a ```python block.\n")
            reference = {"test": check_source(list(zip(problem.inputs, outputs))), "entry_point": ENTRY_POINT}
            response, verifier = shown, "unit_tests"
        return Task(id=task_id, prompt=prompt, reference=reference, verifier=verifier, meta={"response": response, **meta})


def deduction_prompt(program: str, argument: str) -> str:
    """The prompt of a deduction task: the program, then what `f(argument)` returns (the self-play solver's too)."""
    return f"```python\n{program}\n```\nWhat does {ENTRY_POINT}({argument}) return? Put the value in \\boxed{{}}.\n"


def check_source(cases: list[tuple[str, str]]) -> str:
    """A HumanEval-style `check(candidate)` asserting `candidate(x) == y` for each `(x, y)` repr pair."""
    return "def check(candidate):\n" + "".join(f"    assert candidate({x}) == {y}\n" for x, y in cases)


# ---------------------------------------------------------------------- the program templates


def random_program(rng: random.Random, statements: int, depth: int) -> str:
    """A `def f(xs):` with `statements` statements (a block counts 1 plus its body) nested exactly `depth` deep."""
    body = _block(rng, statements, depth, depth, (), top=True)
    text = "\n".join(body)
    used = [name for name in ("acc", "out") if re.search(rf"\b{name}\b", text)]
    returned = rng.choice(used + (["xs"] if re.search(r"^xs = ", text, re.MULTILINE) or not used else []))
    init = [line for name, line in (("acc", "acc = 0"), ("out", "out = []")) if name in used]
    lines = [*init, *body, f"return {returned}"]
    return f"def {ENTRY_POINT}(xs):\n" + "".join(f"    {line}\n" for line in lines).rstrip("\n")


def _block(rng: random.Random, budget: int, depth: int, nest: int, loops: tuple[str, ...], top: bool) -> list[str]:
    """`budget` statements, blocks at most `depth` deep, and one chain of blocks exactly `nest` deep."""
    lines, spine_done = [], nest == 0
    while budget:
        reserve = 0 if spine_done else nest + 1  # statements the required chain still needs
        if not spine_done and (budget == reserve or rng.random() < 0.5):
            size = rng.randint(nest, budget - 1)
            lines += _compound(rng, size, depth, nest, loops)
            budget, spine_done = budget - 1 - size, True
        elif depth and budget - reserve >= 2 and rng.random() < 0.3:
            size = rng.randint(1, budget - reserve - 1)
            lines += _compound(rng, size, depth, 0, loops)
            budget -= 1 + size
        else:
            lines.append(_simple(rng, loops, top))
            budget -= 1
    return lines


def _compound(rng: random.Random, size: int, depth: int, nest: int, loops: tuple[str, ...]) -> list[str]:
    if len(loops) < len(_LOOP_VARS) and rng.random() < 0.6:
        var = _LOOP_VARS[len(loops)]
        header, loops = f"for {var} in xs:", (*loops, var)
    else:
        header = f"if {_condition(rng, loops)}:"
    body = _block(rng, size, depth - 1, max(nest - 1, 0), loops, top=False)
    return [header, *(f"    {line}" for line in body)]


def _simple(rng: random.Random, loops: tuple[str, ...], top: bool) -> str:
    e = _expression(rng, loops)
    options = [f"acc += {e}", f"acc -= {e}", f"out.append({e})", f"acc = max(acc, {e})"]
    if top:  # whole-list statements, never inside a loop over the list
        c, m = rng.randint(2, 5), rng.randint(2, 4)
        options += ["xs = sorted(xs)", "xs = xs[::-1]", f"xs = [v * {c} for v in xs]", f"xs = [v + {c} for v in xs]",
                    f"xs = [v for v in xs if v % {m} != {rng.randrange(m)}]", "acc += sum(xs)", "out.extend(xs)"]
    return rng.choice(options)


def _expression(rng: random.Random, loops: tuple[str, ...]) -> str:
    c, m = rng.randint(1, 9), rng.randint(2, 5)
    if not loops:
        return rng.choice(["len(xs)", str(c), "len(out)"])
    v = rng.choice(loops)
    return rng.choice([v, f"{v} * {rng.randint(2, 5)}", f"{v} % {m}", f"{v} + {c}", "len(out)"])


def _condition(rng: random.Random, loops: tuple[str, ...]) -> str:
    k, m = rng.randint(1, 9), rng.randint(2, 5)
    options = [f"acc > {k}", f"len(out) < {rng.randint(1, 4)}"]
    if loops:
        v = rng.choice(loops)
        options += [f"{v} % {m} == {rng.randrange(m)}", f"{v} > {k}", f"{v} < {k}"] * 2
    if len(loops) >= 2:
        options.append(f"{loops[0]} < {loops[1]}")
    return rng.choice(options)
