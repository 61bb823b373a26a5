"""The rollout vocabulary: `Response` (DESIGN.md §3), `Sampling` and a backend's raw `Completion`.

`Response.rollout_logprobs[i]` is log p(response_ids[i] | prompt_ids + response_ids[:i]) under the
weights of `weight_version`, computed from the RAW logits (temperature 1, before top-p): the same
quantity the learner recomputes with `learner.algos.sft.token_logprobs`, so the two can be compared
or used for truncated importance sampling without knowing the sampling settings. (vLLM's default
`logprobs_mode="raw_logprobs"` is exactly this; the `hf` backend computes the same.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class Response:
    """One sampled response to one task.

    `response_ids` include the eos token when the model stopped on it (the learner must see it to
    learn to stop); `text` is the decoded response without special tokens and, when a stop string
    ended it, cut before that string.
    """

    task_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    text: str
    finish_reason: str
    weight_version: int

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.rollout_logprobs):
            raise ValueError(
                f"Response {self.task_id!r}: {len(self.response_ids)} response_ids but "
                f"{len(self.rollout_logprobs)} rollout_logprobs (expected one logprob per token)"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"Response {self.task_id!r}: finish_reason {self.finish_reason!r} is not one of {FINISH_REASONS}"
            )


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one `generate` call.

    `temperature=0` is greedy. `seed=None` draws fresh randomness; with a seed, sample j of a task is
    reproducible from (seed, task id, j) whichever worker serves the task.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Completion:
    """What a backend returns for one sample: token ids, raw logprobs, text and finish reason."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
