"""Batch building: packing and loss-mask positions on hand-built examples."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.data import encode_prompt, encode_response, pack_pretrain, preference_batch, sft_batch
from engine.models import train_tokenizer
from verifiers.base import Task

# Hand-known ids: one token per whitespace-separated word.
VOCAB = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "<pad>": 9}


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def _task(prompt: str, response: str | None, task_id: str = "t") -> Task:
    return Task(id=task_id, prompt=prompt, reference="", verifier="math", meta={"response": response})


def test_pack_pretrain_joins_with_eos_and_drops_the_partial_row(word_tokenizer):
    batch = pack_pretrain(["a b c", "d e"], word_tokenizer, seq_len=3)
    # stream = a b c <eos> d e <eos> = [1, 2, 3, 0, 4, 5, 0]: two full rows of 3, the last [0] dropped
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 1]]
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32


def test_pack_pretrain_needs_one_full_row(word_tokenizer):
    with pytest.raises(ValueError, match="fewer than one row of seq_len=8"):
        pack_pretrain(["a b"], word_tokenizer, seq_len=8)  # 3 tokens with the eos


def test_sft_batch_masks_response_and_eos_and_right_pads(word_tokenizer):
    batch = sft_batch([_task("a b", "c"), _task("a", "b c d e")], word_tokenizer, max_len=16)
    # row 0: prompt [1, 2] + response [3] + eos [0], padded with <pad>=9 to the longest row (6)
    # row 1: prompt [1] + response [2, 3, 4, 5] + eos [0]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 9, 9], [1, 2, 3, 4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    # position t is a target predicted from tokens < t: the first response token sits right after the prompt
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]
    assert (batch["loss_mask"][:, 0] == 0).all()


def test_sft_batch_truncates_the_response_and_its_eos(word_tokenizer):
    batch = sft_batch([_task("a", "b c d e")], word_tokenizer, max_len=4)
    # prompt [1] kept whole; response [2, 3, 4, 5, 0] cut to 3 tokens, so no eos is learned
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1]]


def test_sft_batch_rejects_a_prompt_without_room(word_tokenizer):
    with pytest.raises(ValueError, match=r"task 'long'.*2 tokens.*max_len=2"):
        sft_batch([_task("a b", "c", task_id="long")], word_tokenizer, max_len=2)


def test_sft_batch_rejects_a_task_without_demonstration(word_tokenizer):
    with pytest.raises(ValueError, match=r"task 'rl-only' has no demonstration"):
        sft_batch([_task("a", None, task_id="rl-only")], word_tokenizer, max_len=8)


def test_chat_prompt_needs_a_chat_template(word_tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt(word_tokenizer, [{"role": "user", "content": "a"}])


def test_prompt_ids_are_a_prefix_of_the_sft_row():
    # A real BPE tokenizer can merge across the prompt/response seam; separate tokenization must not.
    tokenizer = train_tokenizer(
        [f"What is {a}+{b}?\nAnswer: {a + b}" for a in range(10) for b in range(10)], 300
    )
    task = _task("What is 3+4?\n", "Answer: 7")
    row = sft_batch([task], tokenizer, max_len=64)["input_ids"][0].tolist()
    prompt_ids = encode_prompt(tokenizer, task.prompt)
    response_ids = encode_response(tokenizer, "Answer: 7")
    assert row == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(row, skip_special_tokens=True) == "What is 3+4?\nAnswer: 7"


def test_preference_batch_pads_both_sides_to_one_width(word_tokenizer: PreTrainedTokenizerFast) -> None:
    tasks = [Task(id=str(i), prompt="what is it", reference="", verifier="math",
                  meta={"chosen": "one two", "rejected": "three four five six" if i else "one"}) for i in range(2)]
    batch = preference_batch(tasks, word_tokenizer, max_len=32)
    shapes = {tuple(v.shape) for v in batch.values()}
    assert len(shapes) == 1
    # loss on the response tokens and eos only: "one two" + eos = 3, "one" + eos = 2, 4 words + eos = 5
    assert batch["chosen_loss_mask"].sum(-1).tolist() == [3.0, 3.0]
    assert batch["rejected_loss_mask"].sum(-1).tolist() == [2.0, 5.0]
    assert not batch["chosen_loss_mask"][:, 0].any()


def test_preference_batch_cache_tokenises_each_pair_once(word_tokenizer: PreTrainedTokenizerFast) -> None:
    tasks = [Task(id=f"{i}@0", prompt="what is it", reference="", verifier="math",
                  meta={"chosen": "one two", "rejected": "three", "pair": f"p{i}"}) for i in range(3)]
    cache: dict = {}
    first = preference_batch(tasks, word_tokenizer, 32, cache)
    assert len(cache) == 6  # 3 pairs x 2 sides
    tasks[0].meta["chosen"] = "changed text"  # a cached pair is not tokenised again
    again = preference_batch(tasks, word_tokenizer, 32, cache)
    assert all(torch.equal(first[k], again[k]) for k in first)
