"""Batches for the supervised stages: packed pretraining rows, prompt/response SFT rows and preference pairs.

Pure functions from text (or tasks) and a tokenizer to tensors named as DESIGN.md §3 says. One
convention holds for every batch the learner sees:

    logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])

so `loss_mask[:, t] = 1` means "token t is a target, predicted from the tokens before it", and
`loss_mask[:, 0]` is always 0 (nothing precedes it). `attention_mask` is int64 (the Hugging Face
convention), `loss_mask` float32 (it multiplies per-token losses).

Prompts are tokenized exactly as generation will see them (`encode_prompt`; rollout workers should
call the same function): the prompt and the response are tokenized separately and their ids
concatenated, so the prompt's ids are a prefix of the row, whatever BPE would merge across the seam.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from rollout.prompts import encode_prompt, encode_response
from verifiers.base import Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["encode_prompt", "encode_response", "pack_pretrain", "preference_batch", "sft_batch"]


def pack_pretrain(
    docs: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> dict[str, torch.Tensor]:
    """Concatenate documents, each followed by eos, and cut the stream into rows of `seq_len` tokens.

    The final partial row is dropped (no padding: `attention_mask` is all ones); documents may span
    rows and attend to their predecessors in the same row (standard packing, no attention reset).
    """
    eos = _eos_id(tokenizer)
    stream: list[int] = []
    for doc in docs:
        stream += encode_response(tokenizer, doc)
        stream.append(eos)
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"the documents hold {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    input_ids = torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)  # (N, T)
    loss_mask = torch.ones(rows, seq_len, dtype=torch.float32)  # (N, T)
    loss_mask[:, 0] = 0.0  # the first token of a row has no context to be predicted from
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(rows, seq_len, dtype=torch.long),
        "loss_mask": loss_mask,
    }


def sft_batch(tasks: list[Task], tokenizer: PreTrainedTokenizerBase, max_len: int) -> dict[str, torch.Tensor]:
    """Rows `prompt + meta["response"] + eos`, right-padded to the longest row.

    `loss_mask` is 1 exactly on the response tokens and the eos. Truncation: the prompt is kept
    whole (it is what generation conditions on) and the response is cut on the right to fit
    `max_len`; a cut response loses its eos, so the model never learns to stop mid-answer. A prompt
    that leaves no room for one response token is an error naming the task.
    """
    if not tasks:
        raise ValueError("sft_batch needs at least one task")
    rows = [_response_row(task, "response", tokenizer, max_len) for task in tasks]
    return _padded(rows, max(len(ids) for ids, _ in rows), _pad_id(tokenizer))


def preference_batch(tasks: list[Task], tokenizer: PreTrainedTokenizerBase, max_len: int,
                     cache: dict[tuple[str, str], tuple[list[int], int]] | None = None) -> dict[str, torch.Tensor]:
    """The pairs of `tasks` (`meta["chosen"]`, `meta["rejected"]`) as a preference batch: for each side the
    rows `sft_batch` builds (`chosen_input_ids`, `chosen_attention_mask`, `chosen_loss_mask`, and the same
    for `rejected`), both sides padded to one width so the learner runs them in one forward pass.

    `cache` (pair id and side -> the row's ids and prompt length) keeps each pair's tokens from its first
    batch on: a stage that sees its pairs for several epochs tokenises each once.
    """
    if not tasks:
        raise ValueError("preference_batch needs at least one pair")

    def row(task: Task, side: str) -> tuple[list[int], int]:
        if cache is None:
            return _response_row(task, side, tokenizer, max_len)
        key = (str(task.meta["pair"]), side)
        if key not in cache:
            cache[key] = _response_row(task, side, tokenizer, max_len)
        return cache[key]

    sides = {side: [row(task, side) for task in tasks] for side in ("chosen", "rejected")}
    width = max(len(ids) for rows in sides.values() for ids, _ in rows)
    return {f"{side}_{key}": value for side, rows in sides.items()
            for key, value in _padded(rows, width, _pad_id(tokenizer)).items()}


def _response_row(task: Task, key: str, tokenizer: PreTrainedTokenizerBase, max_len: int) -> tuple[list[int], int]:
    """(`prompt + meta[key] + eos` token ids cut to `max_len`, the prompt's length)."""
    response = task.meta.get(key)
    if response is None:
        what = "demonstration" if key == "response" else f"{key} response"
        raise ValueError(f"task {task.id!r} has no {what} (meta[{key!r}] is None); "
                         + ("SFT needs a response for every task" if key == "response" else "a pair needs both sides"))
    if not isinstance(response, str):
        raise TypeError(f"task {task.id!r}: meta[{key!r}] is {type(response).__name__}, expected a string")
    prompt_ids = encode_prompt(tokenizer, task.prompt)
    if not prompt_ids or len(prompt_ids) >= max_len:
        raise ValueError(
            f"task {task.id!r}: the prompt is {len(prompt_ids)} tokens, which leaves no room "
            f"for a response within max_len={max_len}"
        )
    response_ids = (encode_response(tokenizer, response) + [_eos_id(tokenizer)])[: max_len - len(prompt_ids)]
    return prompt_ids + response_ids, len(prompt_ids)


def _padded(rows: list[tuple[list[int], int]], width: int, pad: int) -> dict[str, torch.Tensor]:
    """`(ids, prompt length)` rows right-padded to `width`, with the loss on the tokens after the prompt."""
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.float32)  # (B, T)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, prompt_len : len(ids)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; documents and responses need one to end")
    return int(tokenizer.eos_token_id)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
