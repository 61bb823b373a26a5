"""`LearnerActor`: one learner rank as a Ray actor, a thin shell around `LearnerWorker`.

All logic lives in `learner.worker` so tests can run it without Ray; this file only forwards calls.
The actor's environment (DS_ACCELERATOR, TORCH_EXTENSIONS_DIR, ...) comes from the job's
runtime_env, which `engine.ray_cluster.init_ray` sets to `worker_env()`.
"""

from __future__ import annotations

import ray
from torch import Tensor

from learner.config import LearnerConfig
from learner.plan import StepPlan
from weights import WeightHandle, WeightSpec


@ray.remote(num_cpus=1)
class LearnerActor:
    """Rank `rank` of a `LearnerGroup`."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: str,
        rank: int,
        world_size: int,
        total_steps: int,
        master_port: int,
    ) -> None:
        import torch

        # Imported here so that the driver process never imports DeepSpeed just to create actors.
        from learner.worker import LearnerWorker

        torch.set_num_threads(cfg.threads)
        self.worker = LearnerWorker(cfg, model_dir, rank, world_size, total_steps, master_port)

    def ready(self) -> bool:
        """Returns once the constructor (process group, model, DeepSpeed engine) has finished."""
        return True

    def node_id(self) -> str:
        """The Ray node this rank runs on (`engine.placement` records it)."""
        return ray.get_runtime_context().get_node_id()

    def train_step(self, batch: dict[str, Tensor], num_tokens: int) -> dict[str, float]:
        return self.worker.train_step(batch, num_tokens)

    def train_rl_step(
        self, batch: dict[str, Tensor], plan: StepPlan, publish_version: int | None = None
    ) -> tuple[dict[str, float], WeightHandle | None]:
        """The RL step, then (with `publish_version`) the new weights published in the same call:
        (metrics, rank 0's handle or None)."""
        metrics = self.worker.train_rl_step(batch, plan)
        if publish_version is None:
            return metrics, None
        handle, publish_s = self.worker.publish_weights(publish_version)
        return metrics | {"perf/weight_publish_s": publish_s}, handle

    def train_preference_step(self, batch: dict[str, Tensor], num_pairs: int, num_chosen_tokens: int) -> dict[str, float]:
        return self.worker.train_preference_step(batch, num_pairs, num_chosen_tokens)

    def pair_logps(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.worker.pair_logps(batch)

    def train_reward_step(self, batch: dict[str, Tensor], num_pairs: int) -> dict[str, float]:
        return self.worker.train_reward_step(batch, num_pairs)

    def pair_rewards(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.worker.pair_rewards(batch)

    def logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        return self.worker.logprobs(batch)

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.worker.prepare(batch)

    def state_dict_for_rollout(self) -> dict[str, Tensor]:
        return self.worker.state_dict_for_rollout()

    def attach_weights(self, spec: WeightSpec) -> None:
        self.worker.attach_weights(spec)

    def join_weight_group(self, host: str, port: int, world_size: int) -> None:
        self.worker.join_weight_group(host, port, world_size)

    def publish_weights(self, version: int) -> WeightHandle | None:
        return self.worker.publish_weights(version)[0]

    def close_weights(self) -> None:
        self.worker.close_weights()

    def save(self, directory: str) -> None:
        self.worker.save(directory)

    def load(self, directory: str) -> None:
        self.worker.load(directory)

    def close(self) -> None:
        self.worker.close()
