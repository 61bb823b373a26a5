"""How a prompt becomes token ids: one function, used by rollout, SFT batches and evaluation alike.

It lives in `rollout/` (the lowest layer that tokenizes for generation) so that the engine and the
rollout workers share it without `rollout` importing `engine` (the dependency runs engine → rollout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt as the rollout engine feeds it to the model.

    Text is encoded with the tokenizer's own special tokens (a real Llama gets its BOS; the tiny
    model's tokenizer adds none), as vLLM does for a text prompt. Chat messages go through the
    tokenizer's chat template with the generation prompt appended.
    """
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a chat-message prompt needs a tokenizer with a chat template; this one has none")
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Token ids of a response continuing a prompt (no special tokens; the caller appends eos)."""
    return list(tokenizer.encode(response, add_special_tokens=False))
