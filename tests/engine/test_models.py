"""The model factory: tokenizer and tiny Llama round trips, validation errors, vLLM parity."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach for a model hub

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.models import (
    BUILD_INFO_FILE,
    ModelConfig,
    build_tiny_model,
    check_model_dir,
    prepare_model_dir,
    train_tokenizer,
    validate_model_config,
)
from engine.tasks.arithmetic import ArithmeticSource

CORPUS = list(ArithmeticSource(seed=0).corpus(300))
PROMPTS = ["What is 3+4?\n", "What is 9-2?\n", "Answer: 1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return prepare_model_dir(ModelConfig(), CORPUS, tmp_path_factory.mktemp("models") / "tiny")


def test_tokenizer_encodes_any_text_and_adds_no_special_tokens():
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    assert len(tokenizer) <= 300
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    for text in ["What is 12+7?\nAnswer: 19", "naïve → ünïcode 🙂", "  spaces\t"]:
        ids = tokenizer.encode(text)
        assert tokenizer.eos_token_id not in ids
        assert tokenizer.decode(ids) == text  # byte-level: every byte is in the alphabet
    # BPE learned the corpus: a frequent document costs fewer tokens than its bytes
    assert len(tokenizer.encode("What is 3+4?\nAnswer: 7")) < len(b"What is 3+4?\nAnswer: 7")
    # ...but never merges digits: place-value arithmetic sees one token per digit
    assert tokenizer.tokenize("1234+56") == ["1", "2", "3", "4", "+", "5", "6"]
    merged = train_tokenizer(CORPUS, vocab_size=300, split_digits=False)
    assert len(merged.tokenize("What is 12+7?")) < len(tokenizer.tokenize("What is 12+7?"))


def test_round_trip_through_save_and_from_pretrained(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # the in-memory originals, rebuilt deterministically from the same corpus and seed
    tokenizer0 = train_tokenizer(CORPUS, ModelConfig().vocab_size)
    model0 = build_tiny_model(ModelConfig(), tokenizer0)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    assert ids == [tokenizer0.encode(p) for p in PROMPTS]
    assert model.config.vocab_size == len(tokenizer) and model.config.head_dim == 32
    assert model.config.eos_token_id == tokenizer.eos_token_id
    batch = torch.tensor([ids[0]])
    with torch.no_grad():
        assert torch.equal(model(batch).logits, model0(batch).logits)


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    tokenizer = train_tokenizer(CORPUS, 300)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(ModelConfig(seed=1), tokenizer)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_tiny_model(ModelConfig(seed=1), tokenizer)
    c = build_tiny_model(ModelConfig(seed=2), tokenizer)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_heads": 4}, r"model.hidden_size / model.num_heads = 64 / 4 = 16 is not a head size"),
        ({"hidden_size": 96, "num_heads": 2}, r"= 96 / 2 = 48 is not a head size"),
        (
            {"hidden_size": 100, "num_heads": 3},
            r"model.hidden_size \(100\) must be divisible by model.num_heads",
        ),
        ({"num_kv_heads": 3}, r"model.num_kv_heads \(3\) must divide model.num_heads \(2\)"),
        ({"num_layers": 0}, r"model.num_layers must be a positive integer"),
        ({"vocab_size": 200}, r"model.vocab_size \(200\) must exceed 256"),
    ],
)
def test_invalid_tiny_model_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)  # the dataclass validates itself when built
    # ... also when Hydra/OmegaConf turns an overridden structured config into the dataclass
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), changes)
    with pytest.raises(ValueError, match=message):
        OmegaConf.to_object(merged)


def test_a_checkpoint_path_skips_the_tiny_model_checks():
    validate_model_config(ModelConfig(path="/some/checkpoint", num_heads=4))


def test_supported_head_sizes_pass():
    validate_model_config(ModelConfig(hidden_size=160, num_heads=2))  # head_dim 80
    validate_model_config(ModelConfig(hidden_size=256, num_heads=4, num_kv_heads=1))  # head_dim 64, GQA


def test_model_path_validation(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match=r"model.path='.*nowhere': no such directory"):
        prepare_model_dir(ModelConfig(path=str(tmp_path / "nowhere")), [], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        check_model_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*empty"):
        check_model_dir(tmp_path / "empty")
    # a set path is used as is: nothing is built into out_dir
    assert prepare_model_dir(ModelConfig(path=str(model_dir)), [], tmp_path / "out") == model_dir
    assert not (tmp_path / "out").exists()


def _never_read():
    raise AssertionError("the corpus of an existing model directory must not be read")
    yield ""


def test_prepare_model_dir_is_idempotent_and_refuses_another_config(model_dir):
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_model_dir(ModelConfig(), _never_read(), model_dir) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match=r"different config \(fields differ: model.num_layers\)"):
        prepare_model_dir(ModelConfig(num_layers=3), _never_read(), model_dir)


def test_prepare_model_dir_leaves_nothing_behind_on_failure(tmp_path):
    def broken_corpus():
        yield "What is 1+1?\nAnswer: 2"
        raise RuntimeError("corpus died")

    with pytest.raises(RuntimeError, match="corpus died"):
        prepare_model_dir(ModelConfig(), broken_corpus(), tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match=f"{BUILD_INFO_FILE} is missing"):
        prepare_model_dir(ModelConfig(), CORPUS, tmp_path / "other")


# vLLM runs in a child process: its in-process engine sets up a torch.distributed group and thread
# bindings that would leak into every later test of this session.
_VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
prompts = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]), logprobs=0, ignore_eos=True)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
result = [[list(o.outputs[0].token_ids), [d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]]
          for o in outs]
print("RESULT " + json.dumps(result))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_generation_matches_transformers(tmp_path):
    pytest.importorskip("vllm")
    new_tokens = 8
    # A wider init than the default 0.02 makes the random model's greedy path vary from token to
    # token (with 0.02 it repeats one token), so the comparison covers more than one argmax.
    out = prepare_model_dir(ModelConfig(initializer_range=0.3), CORPUS, tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    expected = []
    for ids in prompt_ids:
        gen = model.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = gen.sequences[0, len(ids) :].tolist()
        # raw logits: `scores` went through min_new_tokens, which masks eos out of the softmax
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.logits, tokens)]
        expected.append((tokens, logprobs))
    assert len({tuple(t) for t, _ in expected}) == len(PROMPTS)  # the prompts lead to different outputs

    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, str(out), json.dumps(prompt_ids), str(new_tokens)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))
    for (tokens, logprobs), (vllm_tokens, vllm_logprobs) in zip(expected, got):
        assert vllm_tokens == tokens
        assert vllm_logprobs == pytest.approx(logprobs, abs=1e-4)
