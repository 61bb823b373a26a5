"""`learner.plan`: how an RL step's rows reach the ranks (pure tensor code, no Ray or DeepSpeed).
That 1 and 2 ranks then train identically is tests/learner/test_rl_step.py's and test_group.py's."""

from __future__ import annotations

import pytest
import torch

from learner.plan import (
    BATCH_KEYS,
    RL_KEYS,
    RL_OPTIONAL_KEYS,
    check_rows,
    minibatch_normalisers,
    minibatch_rank_rows,
    plan_rl_step,
    shard_rows,
    take_rows,
)


def test_batch_keys_are_one_set_in_one_place() -> None:
    keys = BATCH_KEYS + RL_KEYS + RL_OPTIONAL_KEYS
    assert len(set(keys)) == len(keys) and "advantages" in RL_KEYS and "rollout_logprobs" in RL_OPTIONAL_KEYS


def test_minibatch_normalisers_and_rank_rows() -> None:
    mask = torch.zeros(8, 5)
    mask[0, 1:3] = 1  # minibatch 0: 2 tokens in 1 row
    mask[5, 1:] = 1  # minibatch 1: 4 tokens in 1 row
    mask[6, 4] = 1  # ... plus 1 token in another row
    assert minibatch_normalisers(mask, 4) == ([2.0, 5.0], [1.0, 2.0])
    # a minibatch without loss tokens reports 1 (its loss is 0 either way)
    assert minibatch_normalisers(torch.zeros(4, 5), 4) == ([1.0], [1.0])
    # 2 minibatches of 4 over 2 ranks: each rank takes its half of each minibatch
    rows = minibatch_rank_rows(8, 4, 2)
    assert [r.tolist() for r in rows] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_plan_leaves_zero_advantage_rows_out() -> None:
    # 2 minibatches of 4 rows, 2 ranks, 2 loss tokens per row; minibatch 1 has no gradient
    mask = torch.ones(8, 3)
    mask[:, 0] = 0
    adv = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0])[:, None] * mask  # (8, 3)
    plan, index, pad = plan_rl_step(adv, mask, batch_size=4, world_size=2, skip_zero_advantage=True)
    # minibatch 0 keeps rows 0, 2, 3: two per rank, rank 1 padded; minibatch 1 keeps none, but its
    # optimizer step still runs on one padding row per rank
    assert plan.rows == [2, 1]
    assert [i.tolist() for i in index] == [[0, 2, 4], [3, 0, 4]]
    assert [p.tolist() for p in pad] == [[False, False, True], [False, True, True]]
    assert (plan.num_tokens, plan.num_seqs, plan.trained_tokens) == ([8.0, 8.0], [4.0, 4.0], [6.0, 1.0])
    assert plan.skipped_rows_frac == 5 / 8
    taken = take_rows({"loss_mask": mask, "advantages": adv}, index[1], pad[1])
    assert taken["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert taken["advantages"].tolist() == [[0, 2, 2], [0, 0, 0], [0, 0, 0]]
    assert mask.sum() == 16 and adv[0, 1] == 1.0  # the batch itself is untouched
    full, index, pad = plan_rl_step(adv, mask, 4, 2, skip_zero_advantage=False)
    assert (full.rows, full.trained_tokens, full.skipped_rows_frac) == ([2, 2], full.num_tokens, 0.0)
    assert [i.tolist() for i in index] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert not any(p.any() for p in pad)


def test_shards_partition_the_rows() -> None:
    batch = {"input_ids": torch.arange(12).view(6, 2)}
    shards = shard_rows(batch, 3)
    assert [s["input_ids"][:, 0].tolist() for s in shards] == [[0, 2], [4, 6], [8, 10]]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])


def test_uneven_batch_is_rejected() -> None:
    check_rows(8, world_size=2, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"world_size \(2\) x LearnerConfig.micro_batch_size \(2\) = 4"):
        check_rows(6, world_size=2, micro_batch_size=2)
