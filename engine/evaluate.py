"""Held-out evaluation of the supervised stages: generation on eval tasks, scored by each task's verifier.

This generates with transformers in the driver process, from the weights the learner publishes
(`state_dict_for_rollout`), so it measures exactly the model being trained. Verifiers run in-process:
eval sets are small and the scorers are pure Python. The metrics are the RL stage's: `eval/accuracy`
(greedy exact match) and, at the end of a stage, `eval/pass@1` (mean score of G samples at T = 1,
"sampled accuracy") and `eval/pass@G` (any of the G solved).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.collector_base import eval_seed
from engine.data import encode_prompt
from verifiers import Task
from verifiers.registry import load as load_verifier


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int, samples: int = 1,
                   seed: int | None = None, batch_size: int = 32) -> list[str]:
    """`samples` continuations per prompt (prompt-major), decoded without special tokens: greedy when
    `seed` is None, else sampled at temperature 1 from a generator seeded with `seed`."""
    texts: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if seed is not None:
        torch.manual_seed(seed)  # transformers samples from the global generator
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # (B, T)
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])  # (B, T)
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if seed is not None else {
            "do_sample": False}
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             num_return_sequences=samples, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             **sampling)  # (B * samples, T + new)
        texts.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return texts


def heldout_accuracy(model_dir: Path, state_dict: dict[str, torch.Tensor], tokenizer: Any, tasks: list[Task],
                     max_new_tokens: int, samples: int = 0, seed: int = 0) -> dict[str, float]:
    """`eval/accuracy`: the mean verifier score of greedy answers to `tasks`; with `samples` > 0 also
    `eval/pass@1` and `eval/pass@G` over that many samples per task at temperature 1."""
    from transformers import AutoModelForCausalLM

    if not tasks:
        return {"eval/accuracy": 0.0, "eval/tasks": 0.0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=False)
    model.eval()
    verifiers = {name: load_verifier(name) for name in {t.verifier for t in tasks}}  # built once per name

    def scores(answers: list[str], per_task: int) -> torch.Tensor:  # (tasks, per_task)
        got = [verifiers[tasks[i // per_task].verifier].verify(a, tasks[i // per_task]).score or 0.0
               for i, a in enumerate(answers)]
        return torch.tensor(got, dtype=torch.float32).view(len(tasks), per_task)

    prompts = [t.prompt for t in tasks]
    metrics = {"eval/accuracy": float(scores(generate_texts(model, tokenizer, prompts, max_new_tokens), 1).mean()),
               "eval/tasks": float(len(tasks))}
    if samples:
        sampled = scores(generate_texts(model, tokenizer, prompts, max_new_tokens, samples, seed), samples)
        metrics.update({"eval/pass@1": float(sampled.mean()), "eval/pass@G": float((sampled >= 1.0).any(1).float().mean()),
                        "eval/G": float(samples)})
    return metrics


def evaluate_tasks(group: Any, model_dir: Path, tokenizer: Any, tasks: list[Task], cfg: Any,
                   samples: int = 0) -> dict[str, float]:
    """Held-out accuracy of a learner group's current weights on `tasks` (greedy; with `samples`, also
    at T = 1 with the run's evaluation seed), as the offline stages report it."""
    return heldout_accuracy(model_dir, group.state_dict_for_rollout(), tokenizer, tasks, max_new_tokens=cfg.max_len,
                            samples=samples, seed=eval_seed(cfg.seed))
