"""The backends' pure helpers: nucleus sampling and stop-string cutting (hand-checked cases)."""

from __future__ import annotations

import pytest
import torch

from rollout.backends import make_backend
from rollout.hf_backend import _sample_tokens, _stop_cut


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probs 0.5, 0.3, 0.15, 0.05: with top_p 0.7 the nucleus is {0, 1} (0.5 < 0.7 <= 0.8)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    uniforms = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    picked = _sample_tokens(logits, 1.0, 0.7, uniforms)
    assert set(picked.tolist()) == {0, 1}
    # renormalised inside the nucleus: p(0) = 0.5 / 0.8 = 0.625
    assert (picked == 0).float().mean().item() == pytest.approx(0.625, abs=0.04)
    # without top-p every token appears
    everything = _sample_tokens(logits, 1.0, 1.0, uniforms)
    assert set(everything.tolist()) == {0, 1, 2, 3}


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.0], [3.0, -1.0, 0.0]])
    assert _sample_tokens(logits, 0.0, 1.0, torch.rand(2)).tolist() == [1, 0]


def test_inverse_cdf_picks_where_the_uniform_falls():
    # cdf 0.5, 0.5, 0.8, 1.0 (token 1 has no mass): u < 0.5 -> 0, 0.5 <= u < 0.8 -> 2, else 3
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]])).repeat(5, 1)
    uniforms = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.99])
    assert _sample_tokens(logits, 1.0, 1.0, uniforms).tolist() == [0, 0, 2, 2, 3]


def test_stop_cut_uses_the_earliest_stop_string():
    assert _stop_cut("abc\nAnswer: 7", ["Answer", "\n"]) == "abc"
    assert _stop_cut("abc", ["x", ""]) is None


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"rollout.backend='tgi'"):
        make_backend("tgi", "/nowhere", "float32", 128)
