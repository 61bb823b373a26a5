"""The frozen reference policy of the RL KL penalty: a plain torch copy of the starting weights.

GRPO's in-loss KL (`LearnerConfig.kl_coef > 0`) needs pi_ref(token) for every response token. The
reference is the model the learner group was created from, so each rank loads `model_dir` again into
a plain `torch.nn.Module` (no DeepSpeed engine, no optimizer, `requires_grad=False`, eval mode) and
scores batches under `torch.no_grad()`. It is never saved in a checkpoint: on resume it is rebuilt
from `model_dir`, which holds exactly those starting weights.

Scale: one full unsharded copy per rank is right for our CPU-sized models. A large model needs what
verl and OpenRLHF do instead: a ZeRO-3-partitioned inference engine (`deepspeed.init_inference` or a
ZeRO-3 engine without an optimizer) or a separate reference actor group, optionally offloaded to CPU
between uses; the `logprobs` call stays the same.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from learner.algos import token_logprobs


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real tokens of each row; 0 on left padding (as the learner's forward)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


class ReferenceModel:
    """Frozen weights from `model_dir` that score token log-probabilities."""

    def __init__(
        self, model_dir: str, dtype: torch.dtype, device: torch.device, micro_batch_size: int
    ) -> None:
        self.micro_batch_size = micro_batch_size
        self.device = device
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(device)  # type: ignore[arg-type]  # transformers types .to oddly
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Per-token log-probabilities (B, T), float32 on CPU, aligned like `token_logprobs`."""
        out = []
        for start in range(0, input_ids.shape[0], self.micro_batch_size):
            ids = input_ids[start : start + self.micro_batch_size].to(self.device)
            mask = attention_mask[start : start + self.micro_batch_size].to(self.device)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
            ).logits  # (b, T, V)
            out.append(token_logprobs(logits, ids).float().cpu())  # (b, T)
        return torch.cat(out) if out else torch.zeros(input_ids.shape, dtype=torch.float32)
