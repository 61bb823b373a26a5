"""`Response` and `Sampling` refuse inconsistent values with errors that say what was expected."""

from __future__ import annotations

import pytest

from rollout.types import Response, Sampling


def test_response_needs_one_logprob_per_token_and_a_known_finish_reason():
    ok = Response("t", [1, 2], [3, 4], [-0.1, -0.2], "ab", "stop", 0)
    assert ok.weight_version == 0
    with pytest.raises(ValueError, match=r"'t': 2 response_ids but 1 rollout_logprobs"):
        Response("t", [1], [3, 4], [-0.1], "ab", "stop", 0)
    with pytest.raises(ValueError, match=r"finish_reason 'abort' is not one of \('stop', 'length'\)"):
        Response("t", [1], [3], [-0.1], "a", "abort", 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ],
)
def test_sampling_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
