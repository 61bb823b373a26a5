"""`HFBackend`: generation with transformers, the reference backend and the fallback where vLLM is
not installed. Its sampler is our own, so that logprobs are of the raw logits and a seeded prompt's
samples do not depend on what else is in the batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from rollout.types import Completion, Sampling

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFBackend:
    """transformers forward passes with a KV cache over ONE left-padded batch of every prompt × n.

    Sampling is our own loop (not `model.generate`) so that logprobs are of the raw logits, and so
    that seeded samples do not depend on what else is in the call: each prompt has its own
    `torch.Generator`, which draws that prompt's n uniforms per step, and a token is picked from
    them by inverse-CDF sampling over the batch's probabilities. (A prompt's logits in a batch differ
    from its logits alone only by float summation noise, far below anything a draw could resolve.)
    """

    def __init__(self, model_dir: str, dtype: str, max_model_len: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype])
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.max_model_len = max_model_len
        self.eos_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids, default=0)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], n: int, sampling: Sampling, seeds: list[int | None]
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        rows = [ids for ids in prompts for _ in range(n)]
        budgets = torch.tensor(
            [min(sampling.max_tokens, self.max_model_len - len(ids)) for ids in rows], device=self.device
        )  # (R,)
        width = max(len(ids) for ids in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)  # (R, P)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, P): left padding shifts no position
        gens = [_generator(seed, self.device) for seed in seeds]
        steps = int(budgets.max().clamp(min=0))
        tokens = torch.zeros(len(rows), steps, dtype=torch.long, device=self.device)  # (R, T)
        logprobs = torch.zeros(len(rows), steps, device=self.device)  # (R, T)
        lengths = torch.zeros(len(rows), dtype=torch.long, device=self.device)  # (R,)
        done = budgets <= 0  # (R,)
        stopped = torch.zeros_like(done)  # ended by eos or a stop string (else by length)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        cut_texts: dict[int, str] = {}  # the text of a row a stop string ended
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for step in range(steps):
            logits = out.logits[:, -1].float()  # (R, V)
            uniforms = torch.cat([torch.rand(n, generator=g, device=self.device) for g in gens])  # (R,)
            picked = _sample_tokens(logits, sampling.temperature, sampling.top_p, uniforms)  # (R,)
            alive = ~done
            tokens[:, step] = picked
            logprobs[:, step] = torch.log_softmax(logits, -1).gather(1, picked[:, None]).squeeze(1)
            lengths += alive.long()
            hit_eos = alive & torch.isin(picked, eos)
            stopped |= hit_eos
            if sampling.stop:  # decoding every step is only needed to look for stop strings
                for row in (alive & ~hit_eos).nonzero().flatten().tolist():
                    text = self.tokenizer.decode(tokens[row, : step + 1].tolist(), skip_special_tokens=True)
                    if (cut := _stop_cut(str(text), sampling.stop)) is not None:
                        cut_texts[row] = cut
                        stopped[row] = True
            done = done | stopped | (lengths >= budgets)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (R, P + step + 1)
            positions = positions[:, -1:] + 1  # (R, 1)
            out = self.model(
                input_ids=picked[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        completions = []
        for row, (row_tokens, row_logprobs, length, stop) in enumerate(
            zip(tokens.tolist(), logprobs.tolist(), lengths.tolist(), stopped.tolist(), strict=True)
        ):
            kept = row_tokens[:length]
            row_text = cut_texts.get(row)
            if row_text is None:
                row_text = str(self.tokenizer.decode(kept, skip_special_tokens=True))
            completions.append(Completion(kept, row_logprobs[:length], row_text, "stop" if stop else "length"))
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def own_weights(self) -> None:
        """Nothing to do: this backend always copies."""

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]], share: bool = False) -> None:
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"HFBackend.load_weights: {name!r} is not a parameter of the served model")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"HFBackend.load_weights: {name!r} has shape {tuple(tensor.shape)}, the model's is "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int) -> None:
        from weights.nccl import NcclWeightSync

        self.receiver = NcclWeightSync()
        self.receiver.join(host, port, rank, world_size, self.device)

    def receive_broadcast(self, version: int) -> None:
        from weights.base import WeightHandle

        self.load_weights(self.receiver.load(WeightHandle.expected("nccl", version)).items())


def _sample_tokens(logits: Tensor, temperature: float, top_p: float, uniforms: Tensor) -> Tensor:
    """One token id per row of `logits` (R, V): argmax at temperature 0, else nucleus sampling, the
    token of row r being where `uniforms[r]` (in [0, 1)) falls in the row's cumulative distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)  # (R, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)  # (R, V)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely always stays
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    cdf = probs.cumsum(-1)  # (R, V)
    # the first token whose cumulative mass exceeds u: a token of zero mass is never it
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)  # (R,)
    return picked.clamp(max=logits.shape[-1] - 1)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed`, or from the OS when it is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _stop_cut(text: str, stop: list[str]) -> str | None:
    """`text` cut before the earliest stop string it contains, or None when it contains none."""
    hits = [text.find(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None


def _eos_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
