"""Fixtures for the rollout tests: one tiny Llama checkpoint (and its tokenizer) shared by the session.

The model is the embedded default's tiny Llama built with initializer_range 0.3: with the default
0.02 a random model repeats one token greedily, which would make parity checks cover one argmax.
"""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.models import ModelConfig, prepare_model_dir
from engine.tasks.arithmetic import ArithmeticSource
from learner.algos.sft import token_logprobs
from verifiers.base import Task

PROMPTS = ["What is 3+4?\n", "What is 9-2?\n", "Answer: 1"]


_PUBLISHERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def serve(group: Any, state: dict[str, torch.Tensor], version: int) -> dict[str, float]:
    """Publish `state` as `version` from this process, as learner rank 0 does in a run (one publisher
    per group, closed with it), and have every actor of the `RolloutGroup` load it."""
    from rollout.group import local_publisher

    if group not in _PUBLISHERS:
        publisher = local_publisher(group)
        _PUBLISHERS[group] = publisher
        weakref.finalize(group, publisher.close)
    publisher = _PUBLISHERS[group]
    return group.update_weights(lambda v: publisher.publish(state, v), version)


def make_tasks(prompts: list[str] = PROMPTS) -> list[Task]:
    return [Task(id=f"t{i}", prompt=p, reference="", verifier="math") for i, p in enumerate(prompts)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    corpus = list(ArithmeticSource(seed=0).corpus(300))
    out = tmp_path_factory.mktemp("rollout_models") / "tiny"
    return str(prepare_model_dir(ModelConfig(initializer_range=0.3), corpus, out))


def with_extra_eos(model_dir: str, token_id: int, out: Path) -> str:
    """A copy of `model_dir` whose generation config also stops on `token_id` (to make eos happen)."""
    shutil.copytree(model_dir, out)
    gen_file = out / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    eos = gen["eos_token_id"]
    gen["eos_token_id"] = (eos if isinstance(eos, list) else [eos]) + [token_id]
    gen_file.write_text(json.dumps(gen))
    return str(out)


def corrupt_first_bucket(location: str) -> None:
    """Flip one bit of tensor data in the first bucket file of the `shm` slot at `location`."""
    bucket = Path(location) / "bucket-0000.safetensors"
    data = bytearray(bucket.read_bytes())
    data[-8] ^= 0x01
    bucket.write_bytes(bytes(data))


def perturbed_state(model_dir: str, seed: int = 1, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """The checkpoint's weights plus seeded noise: a 'new version' the learner might publish."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (p.detach() + scale * torch.randn(p.shape, generator=gen)).contiguous()
        for name, p in model.named_parameters()
    }


def reference_logprobs(
    model_dir: str,
    prompt_ids: list[int],
    response_ids: list[int],
    state: dict[str, torch.Tensor] | None = None,
) -> list[float]:
    """log p(response token | prefix) from one plain transformers forward over prompt + response."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    ids = torch.tensor([prompt_ids + response_ids])  # (1, T)
    with torch.no_grad():
        logprobs = token_logprobs(model(ids).logits, ids)  # (1, T)
    return logprobs[0, len(prompt_ids) :].tolist()


def reference_greedy(
    model_dir: str, prompt_ids: list[int], max_tokens: int, state: dict[str, torch.Tensor] | None = None
) -> list[int]:
    """Greedy continuation by `model.generate` (eos ignored: exactly `max_tokens` tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
    )
    return out[0, len(prompt_ids) :].tolist()
