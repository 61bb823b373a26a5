"""`LearnerWorker`: one learner rank, supervised and RL training on one DeepSpeed engine.

A plain class (no Ray) so that tests can build one in-process with world_size 1;
`learner.actor.LearnerActor` wraps it for Ray and `learner.group.LearnerGroup` drives W of them as
one torch.distributed group. Read it in three files, each top to bottom:

- `learner.rank` -- set-up (process group, model, DeepSpeed engine, reference, critic), forward
  passes, gradient accumulation, weight publishing (rank 0), checkpoints and the HF export;
- `learner.supervised_step` -- `train_step` (pretraining, SFT);
- `learner.preference_step` -- `train_preference_step` (DPO and its variants) and `pair_logps`;
- `learner.reward_step` -- `train_reward_step` (reward models, `head=reward`) and `pair_rewards`;
- `learner.rl_step` -- `train_rl_step` (GRPO/DAPO/PPO: old/ref logprobs, `ppo_epochs` sweeps of
  minibatch steps, the critic's steps) and `prepare`.
"""

from __future__ import annotations

from learner.preference_step import PreferenceSteps
from learner.rank import BF16_STAGE0_WARNING, TOKENIZER_FILES, ds_config, init_distributed
from learner.reward_step import RewardSteps
from learner.rl_step import RLSteps
from learner.supervised_step import SupervisedSteps

__all__ = ["BF16_STAGE0_WARNING", "TOKENIZER_FILES", "LearnerWorker", "ds_config", "init_distributed"]


class LearnerWorker(SupervisedSteps, PreferenceSteps, RewardSteps, RLSteps):
    """One DeepSpeed rank: supervised, preference, reward-model and RL steps, log-probabilities, weights, checkpoints."""
