"""Held-out evaluation: greedy generation on eval tasks, scored by each task's verifier.

Until the rollout workers exist this generates with transformers in the driver process, from the
weights the learner publishes (`state_dict_for_rollout`), so it measures exactly the model being
trained. Verifiers run in-process: eval sets are small and the scorers are pure Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.data import encode_prompt
from verifiers import Task
from verifiers.registry import load as load_verifier


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int,
                    batch_size: int = 32) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches), decoded without special tokens."""
    texts: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # (B, T)
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])  # (B, T)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        texts.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return texts


def greedy_accuracy(model_dir: Path, state_dict: dict[str, torch.Tensor], tokenizer: Any, tasks: list[Task],
                    max_new_tokens: int) -> dict[str, float]:
    """`eval/accuracy`: the mean verifier score of greedy answers to `tasks`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=False)
    model.eval()
    answers = greedy_generate(model, tokenizer, [t.prompt for t in tasks], max_new_tokens)
    verifiers = {name: load_verifier(name) for name in {t.verifier for t in tasks}}  # built once per name
    scores = [verifiers[task.verifier].verify(answer, task).score or 0.0 for task, answer in zip(tasks, answers)]
    return {"eval/accuracy": sum(scores) / max(len(scores), 1), "eval/tasks": float(len(tasks))}
