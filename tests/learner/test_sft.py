"""token_logprobs and nll_loss against hand-derived numbers."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from learner.algos import LOSSES, nll_loss, token_logprobs


def test_token_logprobs_hand_derived() -> None:
    # Vocab of 2, sequence [0, 1, 0]. logits[:, t] predicts token t + 1.
    # t=1: logits[:, 0] = [0, 0]     -> p(1) = 1/2 -> log 0.5  = -0.693147
    # t=2: logits[:, 1] = [ln 3, 0]  -> p(0) = 3/4 -> log 0.75 = -0.287682
    # t=0: nothing predicts the first token -> 0; logits[:, 2] is unused.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    input_ids = torch.tensor([[0, 1, 0]])
    out = token_logprobs(logits, input_ids)
    assert out.shape == (1, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.0, math.log(0.5), math.log(0.75)]]))


def test_token_logprobs_chunking_and_bf16_match_full_log_softmax() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    input_ids = torch.randint(0, 11, (3, 7), generator=gen)
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (3, 6)
    for chunk_rows in (1, 5, 4096):
        out = token_logprobs(logits, input_ids, chunk_rows=chunk_rows)
        torch.testing.assert_close(out[:, 1:], full)
        assert bool((out[:, 0] == 0).all())
    bf16 = token_logprobs(logits.bfloat16(), input_ids)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16[:, 1:], full, atol=3e-2, rtol=0)


def test_token_logprobs_gradient_is_onehot_minus_softmax() -> None:
    # d log softmax(z)[y] / dz = onehot(y) - softmax(z); with z = [0, 0] and y = 1: [-0.5, 0.5].
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    token_logprobs(logits, torch.tensor([[0, 1]])).sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.5, 0.5], [0.0, 0.0]]]))


def test_token_logprobs_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="input_ids"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_nll_loss_hand_derived() -> None:
    logprobs = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, -4.0]])
    loss_mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    # selected -logprobs: 1 + 2 + 3 = 6 over 3 tokens -> 2.0
    loss, metrics = nll_loss(logprobs, loss_mask, num_tokens=3)
    assert loss.item() == pytest.approx(2.0)
    assert metrics == {"learner/nll_sum": pytest.approx(6.0)}


def test_nll_loss_shards_sum_to_global_mean() -> None:
    # Row 0 has 2 loss tokens (nll 1+2), row 1 has 1 (nll 3). Global mean = 6/3 = 2.
    # Shards normalised by the global count: 3/3 + 3/3 = 2 (exact).
    # Per-shard means would give (1.5 + 3) / 2 = 2.25: the bias the global count avoids.
    logprobs = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, -4.0]])
    loss_mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    first, _ = nll_loss(logprobs[:1], loss_mask[:1], num_tokens=3)
    second, _ = nll_loss(logprobs[1:], loss_mask[1:], num_tokens=3)
    assert first.item() + second.item() == pytest.approx(2.0)


def test_nll_loss_errors() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        nll_loss(torch.zeros(1, 2), torch.zeros(1, 2), num_tokens=0)
    with pytest.raises(ValueError, match="loss_mask"):
        nll_loss(torch.zeros(1, 2), torch.zeros(1, 3), num_tokens=1)


def test_losses_registry_is_a_plain_dict() -> None:
    assert type(LOSSES) is dict
    assert LOSSES["nll"] is nll_loss


def test_algos_import_without_ray_deepspeed_vllm() -> None:
    code = (
        "import sys\n"
        "for name in ('ray', 'deepspeed', 'vllm'):\n"
        "    sys.modules[name] = None\n"
        "import learner.algos, learner.config, learner.schedule\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
