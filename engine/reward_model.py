"""The `reward_model` verifier: scores responses with a reward model directory that `stage=rm` exported.

A response is scored as the reward model was trained (`engine.data`'s rows: the prompt as generation
sees it, the response, eos), by one forward pass of the `AutoModelForSequenceClassification` in the
directory (`verifier.options.reward_model.path=runs/<name>/rm/final/hf`). With `normalise=sigmoid` (the
default) the score is sigmoid(reward), in (0, 1), so it composes with 0/1 verifiers in
`verifier.rewards`; with `normalise=none` it is the raw reward (`score_range` is then the whole line).

It declares `batched = True`: the verifier-pool actor scores its items in batches of `batch_size` in the
actor's own process (`engine.scoring.VerifierPoolActor`), one model per actor, instead of sending them
one by one to process workers that would each load the model. It lives in the engine, not in
`verifiers/`, because it needs torch and transformers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.data import sft_batch
from verifiers.base import Task, Verdict, infra_error

NORMALISATIONS = ("sigmoid", "none")


class RewardModelVerifier:
    """Scores (response, task) items with a one-label sequence-classification model."""

    name = "reward_model"
    batched = True

    def __init__(self, path: str, batch_size: int = 32, normalise: str = "sigmoid", max_len: int = 512,
                 threads: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if normalise not in NORMALISATIONS:
            raise ValueError(f"verifier.options.reward_model.normalise={normalise!r}: expected one of {NORMALISATIONS}")
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"verifier.options.reward_model.path={path!r}: not a model directory "
                                    "(no config.json); give the final/hf export of a stage=rm run")
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has one label, this one {self.model.config.num_labels}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.batch_size, self.normalise, self.max_len = batch_size, normalise, max_len
        self.score_range = (0.0, 1.0) if normalise == "sigmoid" else (-math.inf, math.inf)

    def verify(self, response: str, task: Task) -> Verdict:
        return self.verify_batch([(response, task)])[0]

    def verify_batch(self, items: list[tuple[str, Task]]) -> list[Verdict]:
        """One verdict per item, in order, scored in batches of `batch_size`; an item that cannot be
        tokenised (a prompt longer than `max_len`) is an infra error, its batch's others are scored."""
        rows = [Task(id=task.id, prompt=task.prompt, reference="", verifier=self.name, meta={"response": response})
                for response, task in items]
        return [v for start in range(0, len(rows), self.batch_size)
                for v in self._score(rows[start : start + self.batch_size])]

    def _score(self, rows: list[Task]) -> list[Verdict]:
        try:
            batch = sft_batch(rows, self.tokenizer, self.max_len)  # tokenised once in the common case
        except ValueError as err:
            if len(rows) == 1:
                return [infra_error("error", f"reward_model: {err}")]
            return [v for row in rows for v in self._score([row])]  # find the item at fault
        with torch.no_grad():
            rewards = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        return [Verdict(1.0 / (1.0 + math.exp(-r)) if self.normalise == "sigmoid" else r, f"reward {r:.4f}",
                        {"reward_model/reward": r}) for r in rewards.tolist()]
