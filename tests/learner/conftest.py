"""Fixtures for the learner tests: a tiny Llama checkpoint on disk and fixed random token batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

VOCAB = 256
SEQ = 16


def make_batch(rows: int, seed: int, seq: int = SEQ, pad_right: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; the last `pad_right` columns of odd rows are padding; token 0 is never scored."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, seq), generator=gen)
    attention_mask = torch.ones(rows, seq, dtype=torch.long)
    if pad_right:
        attention_mask[1::2, seq - pad_right :] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer Llama (hidden 64, 2 heads of 32, vocab 256) in HF format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    out = Path(tmp_path_factory.mktemp("tiny_llama"))
    LlamaForCausalLM(config).save_pretrained(out)
    (out / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return str(out)
