"""The model factory: a local Hugging Face checkpoint, or a tiny Llama that Assay builds itself.

No model hub is reachable where Assay's embedded default runs, so with `model.path` unset we train a
byte-level BPE tokenizer on the task corpus and randomly initialise a small Llama-architecture model
(seeded), then save both with `save_pretrained` into one directory. From then on every part of the
stack (the DeepSpeed learner, vLLM rollout workers, the reference backend) loads that directory
exactly as it would load a real checkpoint: only `model.path` differs.

Two constraints shape the tiny model:
- vLLM's CPU attention kernels support only some head sizes (32, 64, 80, 96, 112, 128, 160, 192,
  224, 256), so `hidden_size / num_heads` is validated against that list up front instead of failing
  deep inside a rollout worker.
- The saved model's vocabulary is exactly the trained tokenizer's (`len(tokenizer)`), which may be
  smaller than `vocab_size` when the corpus runs out of merges: an embedding row without a token
  would let sampling emit ids that decode to nothing.

The tokenizer adds no special tokens on encode and has no chat template: prompts are plain text
and a document ends with `<|endoftext|>` (eos, also used as pad and bos).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
# Head sizes vLLM's CPU attention backend implements.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# Written next to the weights of a model Assay built, to recognise (and refuse to silently reuse)
# a directory built from a different config.
BUILD_INFO_FILE = "assay_model.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelConfig:
    """Which model to train: a local checkpoint directory, or the knobs of the tiny built-in Llama."""

    path: str | None = None
    """A local Hugging Face causal-LM checkpoint directory (config.json + weights + tokenizer files).
    When set it is used as is and every other field is ignored. Never a hub id: nothing downloads."""

    hidden_size: int = 64
    """Width of the tiny model's residual stream."""

    intermediate_size: int = 256
    """Width of the tiny model's SwiGLU MLP."""

    num_layers: int = 2
    """Number of transformer blocks."""

    num_heads: int = 2
    """Attention heads; `hidden_size / num_heads` must be a head size vLLM's CPU backend supports
    (32, 64, 80, 96, 112, 128, 160, 192, 224 or 256)."""

    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide `num_heads`."""

    max_position_embeddings: int = 256
    """Longest sequence (prompt + response) the tiny model is built for."""

    vocab_size: int = 512
    """Target size of the byte-level BPE vocabulary (256 byte tokens + specials + merges). The model's
    embedding has exactly as many rows as the trained tokenizer has tokens, which can be fewer."""

    split_digits: bool = True
    """Tokenize every digit on its own (as Llama's and DeepSeek's tokenizers do), so place-value
    arithmetic is learnable digit by digit. `false` lets BPE merge digit runs: whole 2-digit numbers
    become single tokens, which a 0.1 M-parameter model memorises into a lookup table faster (measured:
    held-out 2-digit addition after pretrain + SFT, 0.58 merged against 0.09 split) but which does not
    carry over to longer numbers."""

    tie_word_embeddings: bool = True
    """Share the input embedding and the output projection (halves the parameters of a tiny model)."""

    rope_theta: float = 10000.0
    """RoPE base frequency."""

    rms_norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers."""

    initializer_range: float = 0.02
    """Standard deviation of the random normal initialisation."""

    seed: int = 0
    """Seed of the random initialisation (the tokenizer is deterministic given the corpus)."""

    def __post_init__(self) -> None:
        validate_model_config(self)  # fail where the config is built, not inside a rollout worker


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise `ValueError` naming the offending `model.*` field if the tiny model cannot be built or
    served by vLLM on CPU. A config with `path` set is not checked here (see `check_model_dir`)."""
    if cfg.path is not None:
        return
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "max_position_embeddings",
        "vocab_size",
    ):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"model.hidden_size ({cfg.hidden_size}) must be divisible by model.num_heads ({cfg.num_heads})"
        )
    head_dim = cfg.hidden_size // cfg.num_heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"model.hidden_size / model.num_heads = {cfg.hidden_size} / {cfg.num_heads} = {head_dim} is not "
            f"a head size vLLM's CPU attention supports {VLLM_CPU_HEAD_SIZES}; change model.hidden_size "
            f"or model.num_heads{_head_hint(cfg.hidden_size)}"
        )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"model.num_kv_heads ({cfg.num_kv_heads}) must divide model.num_heads ({cfg.num_heads})"
        )
    if cfg.vocab_size < 257:
        raise ValueError(
            f"model.vocab_size ({cfg.vocab_size}) must exceed 256 (the byte alphabet) + 1 special"
        )


def _head_hint(hidden_size: int) -> str:
    """A suggestion of num_heads that gives a supported head size for this hidden_size, if any."""
    fits = [(hidden_size // d, d) for d in VLLM_CPU_HEAD_SIZES if hidden_size % d == 0]
    return f" (e.g. num_heads={fits[0][0]} for head_dim {fits[0][1]})" if fits else ""


def train_tokenizer(corpus: Iterable[str], vocab_size: int, split_digits: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` (deterministic for a given corpus).

    Every byte is in the alphabet, so any text encodes; with `split_digits` digits are never merged;
    `<|endoftext|>` is eos, pad and bos, and is never added by `encode` (callers append eos where a
    document ends).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by `cfg`, its vocabulary matched to `tokenizer` (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    validate_model_config(cfg)
    eos_id = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    saved_rng = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(saved_rng)  # don't disturb the caller's RNG stream
    model.generation_config.bos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """Return `path` if it looks like a loadable local checkpoint, else raise naming what is missing."""
    model_dir = Path(path).expanduser()
    where = f"model.path={str(path)!r}"
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"{where}: no such directory (model.path must be a local Hugging Face checkpoint directory; "
            "hub ids are not downloaded)"
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{where}: {model_dir / 'config.json'} is missing (expected a model config)")
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{where}: no tokenizer files in {model_dir} (expected one of {', '.join(_TOKENIZER_FILES)} "
            "next to config.json; save the tokenizer with tokenizer.save_pretrained(dir))"
        )
    return model_dir


def prepare_model_dir(cfg: ModelConfig, corpus: Iterable[str], out_dir: Path) -> Path:
    """The checkpoint directory every role loads.

    With `cfg.path` set: validate and return it (`corpus` and `out_dir` unused). Otherwise train the
    tokenizer on `corpus`, build the tiny model and save both into `out_dir`. The write is atomic
    (a temporary sibling directory renamed into place), and a finished `out_dir` built from the same
    config is returned as is without reading `corpus`; one built from another config is an error
    rather than a silent reuse.
    """
    if cfg.path is not None:
        return check_model_dir(cfg.path)
    validate_model_config(cfg)
    out_dir = Path(out_dir)
    wanted = _build_info(cfg)
    if out_dir.exists():
        return _reuse(out_dir, wanted)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = train_tokenizer(corpus, cfg.vocab_size, cfg.split_digits)
        model = build_tiny_model(cfg, tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / BUILD_INFO_FILE).write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.exists():
                raise
            # Another process finished the same directory first: use theirs.
            shutil.rmtree(tmp, ignore_errors=True)
            return _reuse(out_dir, wanted)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _build_info(cfg: ModelConfig) -> dict[str, dict[str, object]]:
    info = asdict(cfg)
    info.pop("path")
    return {"model": info}


def _reuse(out_dir: Path, wanted: dict[str, dict[str, object]]) -> Path:
    info_file = out_dir / BUILD_INFO_FILE
    if not info_file.is_file():
        raise FileExistsError(
            f"{out_dir} exists but is not a model directory Assay built ({BUILD_INFO_FILE} is missing); "
            "remove it or choose another output directory"
        )
    found = json.loads(info_file.read_text())
    if found != wanted:
        built = found.get("model", {})
        diff = sorted(k for k, v in wanted["model"].items() if built.get(k) != v)
        raise FileExistsError(
            f"{out_dir} holds a tiny model built from a different config (fields differ: "
            f"{', '.join('model.' + k for k in diff)}); remove it or choose another output directory"
        )
    return out_dir


class ModelDirError(ValueError):
    """A checkpoint directory whose config and weights do not fit together."""


def check_weights(model_dir: Path) -> None:
    """Compare the shape of every tensor in the safetensors files with the model `config.json` implies
    (built on the meta device: no memory, ~1 s), so a mismatch is one line naming both files before any
    actor starts instead of a transformers error inside a learner. Checkpoints without safetensors
    files are not checked."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 -- a config transformers cannot build a model from
        raise ModelDirError(f"{model_dir / 'config.json'}: cannot build a causal LM from it "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 -- safe_open is no dict
        except Exception as err:  # noqa: BLE001 -- a truncated or foreign file
            raise ModelDirError(f"{file}: not a readable safetensors file ({err})") from None
        for name, shape in found.items():
            if name in expected and expected[name] != shape:
                raise ModelDirError(f"{file}: tensor {name} has shape {list(shape)} but {model_dir / 'config.json'} "
                                    f"implies {list(expected[name])}: the config does not describe these weights")

