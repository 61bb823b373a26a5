"""`stage=dpo`: preference training on (prompt, chosen, rejected) pairs through the shared offline loop.

The recipe (`engine.runs.Recipe`) the offline loop of `engine.supervised` runs for DPO and its variants
(`learner.preference_loss`: `dpo`, `ipo`, `hinge`, `simpo`; `learner.algos.preference` has the maths):

- **Reference log-probabilities, once.** The reference is the stage's starting model (the SFT export).
  Before the first step -- before a resumed run loads its checkpoint -- the learner group, which still
  holds exactly those weights, scores once each pair the run will draw (the stream read ahead and
  rewound; at most every training pair) and the held-out pairs, in draw order and fixed chunks, and the
  numbers are kept in `reference_logps.pt` in the run directory (written atomically).
  Every batch then carries its pairs' reference numbers: no reference model lives next to the policy,
  trainable or frozen, and no step pays a second forward pass. A resumed run reads the file (or, if
  it is gone, scores the pairs again before loading the checkpoint: the same numbers). `simpo` uses
  no reference and skips all of this.
- **Batches** are `learner.batch_size` pairs from the task source (`task=pairs` for a file,
  `task=arithmetic_pairs` for the generated demo pairs), tokenised like SFT rows
  (`engine.data.preference_batch`).
- **Evaluation** at `eval_every` and at the end: on the `task.eval_size` held-out pairs, the loss and
  `eval/preference_accuracy` (the share of pairs whose implicit reward ranks chosen above rejected)
  and `eval/reward_margin`; when the pairs carry a reference answer, also the held-out greedy
  accuracy the SFT stage reports (`eval/accuracy`), so the two stages compare directly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError
from engine.data import preference_batch
from engine.evaluate import evaluate_tasks
from engine.runs import Recipe
from engine.tasks import TaskSource
from learner.algos import (
    PREFERENCE_LOSSES,
    PairLogps,
    PreferenceSettings,
    bradley_terry_loss,
    preference_loss,
)
from verifiers.base import Task

REFERENCE_FILE = "reference_logps.pt"
REFERENCE_CHUNK_BATCHES = 4
"""Training batches of pairs per call while the reference is scored."""


def dpo_recipe(cfg: Any, group: Any, source: TaskSource, tokenizer: Any, model_dir: Path, run_dir: Path) -> Recipe:
    """The DPO stage's batches, step and evaluation (see the module docstring); `source` yields pairs
    (`require_pairs`, checked before the run directory opens)."""
    learner = cfg.learner
    start = time.perf_counter()
    held_out = source.eval_tasks(cfg.task.eval_size)
    tokens: dict[tuple[str, str], tuple[list[int], int]] = {}  # each pair tokenised once, whatever the epochs
    reference = (reference_logps(run_dir, group, [*drawn_pairs(source, cfg), *held_out], tokenizer, cfg, tokens)
                 if PREFERENCE_LOSSES[learner.preference_loss].uses_reference else None)
    first_step = {"perf/reference_s": time.perf_counter() - start}  # logged with step 1
    held_out_batch = preference_batch(held_out, tokenizer, cfg.max_len)
    settings = PreferenceSettings(learner.preference_beta, learner.preference_label_smoothing, learner.simpo_gamma)

    def batch() -> dict[str, torch.Tensor]:
        tasks = source.sample(learner.batch_size)
        out = preference_batch(tasks, tokenizer, cfg.max_len, tokens)
        return out | _lookup(reference, tasks) if reference is not None else out

    def evaluate(samples: int) -> dict[str, float]:
        scored = group.pair_logps(held_out_batch)
        policy = PairLogps(scored["chosen"], scored["rejected"], scored["chosen_tokens"], scored["rejected_tokens"])
        ref = None
        if reference is not None:
            looked_up = _lookup(reference, held_out)
            ref = PairLogps(looked_up["ref_chosen_logps"], looked_up["ref_rejected_logps"], policy.chosen_tokens,
                            policy.rejected_tokens)
        loss, metrics = preference_loss(learner.preference_loss, policy, ref, settings, len(held_out))
        out = {"eval/preference_loss": float(loss), "eval/preference_accuracy": metrics["rewards/accuracy"],
               "eval/reward_margin": metrics["rewards/margin"]}
        if all(task.meta.get("judged") for task in held_out):  # the pairs carry answers a verifier checks
            out |= evaluate_tasks(group, model_dir, tokenizer, held_out, cfg, samples)
        return out

    def train(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = group.train_preference_step(batch) | first_step
        first_step.clear()
        return metrics  # type: ignore[no-any-return]

    return Recipe(batch=batch, train=train, evaluate=evaluate)


def rm_recipe(cfg: Any, group: Any, source: TaskSource, tokenizer: Any, model_dir: Path, run_dir: Path) -> Recipe:
    """The RM stage: the Bradley-Terry loss on the pairs (with their `margin` when the data has one), and
    the held-out pair accuracy of the rewards."""
    held_out = source.eval_tasks(cfg.task.eval_size)
    held_out_batch = preference_batch(held_out, tokenizer, cfg.max_len)
    tokens: dict[tuple[str, str], tuple[list[int], int]] = {}

    def batch() -> dict[str, torch.Tensor]:
        tasks = source.sample(cfg.learner.batch_size)
        out = preference_batch(tasks, tokenizer, cfg.max_len, tokens)
        margins = [task.meta.get("margin") for task in tasks]
        if any(m is not None for m in margins):
            out["margin"] = torch.tensor([m or 0.0 for m in margins], dtype=torch.float32)
        return out

    def evaluate(samples: int) -> dict[str, float]:
        rewards = group.pair_rewards(held_out_batch)
        loss, metrics = bradley_terry_loss(rewards["chosen"], rewards["rejected"], len(held_out))
        return {"eval/rm_loss": float(loss), "eval/rm_accuracy": metrics["rewards/accuracy"],
                "eval/reward_margin": metrics["rewards/margin"], "eval/reward_std": float(
                    torch.cat([rewards["chosen"], rewards["rejected"]]).std())}

    return Recipe(batch=batch, train=group.train_reward_step, evaluate=evaluate)


def require_pairs(cfg: Any, source: TaskSource) -> None:
    """Refuse a task source without preference pairs (before the run directory is opened)."""
    if not callable(getattr(source, "training_pairs", None)):
        raise ConfigError(f"stage=dpo trains on preference pairs, but task.source={cfg.task.source!r} yields single "
                              "responses: use task=pairs (task.pairs.path=FILE) or task=arithmetic_pairs")


def drawn_pairs(source: TaskSource, cfg: Any) -> list[Task]:
    """Each training pair the stage's `steps` batches will draw, once, in draw order: the stream is read
    ahead from its start and rewound. An epoch draws every training pair once, so reading stops after
    one (pairs of equal content count once)."""
    state = source.state_dict()
    wanted = min(cfg.steps * cfg.learner.batch_size, source.training_pairs())  # type: ignore[attr-defined]
    seen: dict[str, Task] = {}
    drawn = 0
    while drawn < wanted:
        for task in source.sample(min(cfg.learner.batch_size, wanted - drawn)):
            seen.setdefault(task.meta["pair"], task)
        drawn += cfg.learner.batch_size
    source.load_state_dict(state)
    return list(seen.values())


def reference_logps(run_dir: Path, group: Any, pairs: list[Task], tokenizer: Any, cfg: Any,
                    tokens: dict[tuple[str, str], tuple[list[int], int]] | None = None) -> dict[str, tuple[float, float]]:
    """Pair id -> the reference's (chosen, rejected) sequence log-probabilities of `pairs`: read from the
    run directory, or scored now by `group` (which must hold the starting weights) and written there."""
    path = run_dir / REFERENCE_FILE
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("max_len") == cfg.max_len and all(t.meta["pair"] in saved["logps"] for t in pairs):
            return {k: (float(c), float(r)) for k, (c, r) in saved["logps"].items()}
        print(f"[assay] dpo: {path} is of other pairs or settings; scoring the reference again")
    print(f"[assay] dpo: scoring the {len(pairs)} pairs this stage uses with the reference (the starting weights), once")
    logps: dict[str, tuple[float, float]] = {}
    chunk = REFERENCE_CHUNK_BATCHES * cfg.learner.batch_size  # fewer, larger calls: no gradients to hold
    for start in range(0, len(pairs), chunk):
        tasks = pairs[start : start + chunk]
        scored = group.pair_logps(preference_batch(tasks, tokenizer, cfg.max_len, tokens))
        for task, c, r in zip(tasks, scored["chosen"].tolist(), scored["rejected"].tolist()):
            logps[task.meta["pair"]] = (c, r)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"max_len": cfg.max_len, "logps": logps}, tmp)
    os.replace(tmp, path)  # atomic: a run stopped mid-write leaves no half file
    return logps


def _lookup(reference: dict[str, tuple[float, float]], tasks: list[Task]) -> dict[str, torch.Tensor]:
    rows = [reference[task.meta["pair"]] for task in tasks]
    return {"ref_chosen_logps": torch.tensor([c for c, _ in rows], dtype=torch.float32),
            "ref_rejected_logps": torch.tensor([r for _, r in rows], dtype=torch.float32)}
