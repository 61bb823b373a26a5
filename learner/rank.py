"""One learner rank's machinery: a Hugging Face causal LM in a DeepSpeed engine, its forward passes,
gradient accumulation, weight publishing and checkpoints -- what supervised and RL training share.

`learner.supervised_step` and `learner.rl_step` add the two kinds of step on top; `learner.worker`
puts them together as `LearnerWorker`. Departures from a stock DeepSpeed training loop, and why:
- Losses are normalised by the GLOBAL loss-token count (see `learner.algos.sft`), so the micro-batch
  losses already sum to the global mean. DeepSpeed would divide by the accumulation steps and average
  gradients over ranks; we call `backward(..., scale_wrt_gas=False)` and multiply the loss by
  world_size to undo both, which makes W ranks reproduce one rank's gradient exactly.
- The accumulation boundary is set by hand on the last micro-batch, so a step may hold any multiple
  of micro_batch_size rows per rank (RL batches vary in size), not only the configured batch_size.
- Position ids come from the attention mask (`cumsum - 1`), so left-padded rows (rollout prompts)
  get the same positions as the unpadded sequences vLLM scored.
"""

from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at import time; without CUDA it must be told to use the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM, PreTrainedModel

from learner.algos import LOSSES, POLICY_LOSSES, token_logprobs
from learner.config import LearnerConfig, validate
from learner.critic import ValueModel
from learner.plan import BATCH_KEYS
from learner.reference import ReferenceModel, position_ids_from_mask
from learner.schedule import build_scheduler
from weights import WeightHandle, WeightSpec, WeightSync, make_publisher

# Files copied from model_dir into an HF export besides the weights and config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
BF16_STAGE0_WARNING = (
    "LearnerConfig: precision=bf16 with zero_stage=0 runs DeepSpeed's pure-bf16 data parallel "
    "(bf16 weights, gradients and AdamW state, no fp32 master copy); zero_stage>=1 keeps fp32 master "
    "weights at the same memory cost on one rank"
)


def ds_config(cfg: LearnerConfig, grad_accum: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` (ZeRO stage, precision, clipping, batch geometry)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        # ZeRO 1-3 keep fp32 master weights; fp32 gradient accumulation makes ZeRO-1 take the same
        # path. DeepSpeed has no fp32 master copy for bf16 at stage 0 (see BF16_STAGE0_WARNING).
        "data_types": {"grad_accum_dtype": "fp32"} if cfg.precision == "bf16" and cfg.zero_stage > 0 else {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def init_distributed(rank: int, world_size: int, master_port: int) -> None:
    """Join the learner process group on 127.0.0.1:`master_port` (gloo on CPU, nccl on GPU).

    A process joins one group for its lifetime (DeepSpeed caches its groups); joining again with
    the same rank and world size is a no-op, with different ones an error.
    """
    if torch.distributed.is_initialized():
        have = (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if have != (rank, world_size):
            raise RuntimeError(
                f"LearnerWorker: this process already joined a learner group as (rank, world_size) = "
                f"{have}; it cannot join another as {(rank, world_size)}"
            )
        return
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its device is always index 0.
            "LOCAL_RANK": "0",
        }
    )
    backend = get_accelerator().communication_backend_name()
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{master_port}", rank=rank, world_size=world_size
    )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def check_batch(batch: dict[str, Tensor], micro_batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, loss_mask) after checking shapes, row count and column 0."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"learner batch: missing {missing}; expected keys {list(BATCH_KEYS)}")
    input_ids, attention_mask, loss_mask = (batch[k] for k in BATCH_KEYS)
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            "learner batch: input_ids, attention_mask and loss_mask must share one (B, T) shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(loss_mask.shape)}"
        )
    rows = input_ids.shape[0]
    if rows == 0 or rows % micro_batch_size != 0:
        raise ValueError(
            f"learner batch: this rank got {rows} rows, which must be a positive multiple of "
            f"LearnerConfig.micro_batch_size ({micro_batch_size})"
        )
    if bool(loss_mask[:, 0].any()):
        raise ValueError(
            "learner batch: loss_mask[:, 0] must be 0 — token 0 has no prefix to predict it from "
            "(logprobs[:, t] scores input_ids[:, t] given input_ids[:, :t])"
        )
    return input_ids, attention_mask, loss_mask



class LearnerRank:
    """One DeepSpeed rank without its training steps: forward passes, accumulation, weights, checkpoints."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: str,
        rank: int,
        world_size: int,
        total_steps: int,
        master_port: int = 29500,
    ) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = validate(cfg, world_size)
        self.loss_fn = _pick_loss(cfg.loss)
        if cfg.precision == "bf16" and cfg.zero_stage == 0:
            warnings.warn(BF16_STAGE0_WARNING, stacklevel=2)
        init_distributed(rank, world_size, master_port)
        torch.manual_seed(cfg.seed + rank)
        self.engine = _build_engine(cfg, _policy_model(cfg, model_dir), cfg.lr, total_steps, self.grad_accum,
                                    world_size)
        self.device = self.engine.device
        self.step = 0
        self.policy_loss = POLICY_LOSSES[cfg.policy_loss]
        # Built only when a KL term (loss or reward) needs it; rebuilt from model_dir (never
        # checkpointed) on resume.
        self.reference = (
            ReferenceModel(model_dir, _dtype(cfg.precision), self.device, cfg.micro_batch_size)
            if cfg.kl_coef > 0 or cfg.kl_reward_coef > 0
            else None
        )
        # PPO's value model, its own DeepSpeed engine with the policy's batch geometry (learner.critic).
        self.critic = (
            _build_engine(cfg, ValueModel(cfg.critic.path or model_dir), cfg.critic.lr, total_steps,
                          self.grad_accum, world_size)
            if cfg.critic.enabled
            else None
        )
        self.publisher: WeightSync | None = None  # rank 0's, once `attach_weights` ran


    @torch.no_grad()
    def logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-token log-probabilities (B, T) of `batch["input_ids"]` under the current weights, on CPU.

        Under ZeRO-3 every rank must call this with the same number of rows (the forward gathers
        parameters collectively).
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        self.engine.eval()
        out = [self._forward_logprobs(input_ids[rows], attention_mask[rows]).cpu()
               for rows in self._micro_slices(input_ids.shape[0])]
        return torch.cat(out) if out else torch.zeros(input_ids.shape, dtype=torch.float32)

    def _forward_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        attention_mask = attention_mask.to(self.device)
        out = self.engine(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.logits  # (b, T, V)

    def _forward_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = self._forward_logits(input_ids, attention_mask)  # (b, T, V)
        return token_logprobs(logits, input_ids.to(self.device))  # (b, T)


    def _optimizer_step(self, rows: int, micro_loss: Any) -> dict[str, float]:
        """One optimizer step of the policy over `rows` rows (`_accumulate`), counted, with the numbers every
        one-step call reports besides `micro_loss`'s: grad norm, lr, step, seconds and tokens/s (the
        metrics must hold `learner/seq_tokens`)."""
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        totals, grad_norm = self._accumulate(self.engine, rows, micro_loss)
        self.step += 1
        elapsed = time.perf_counter() - start
        return totals | {"learner/grad_norm": grad_norm, "learner/lr": float(lr), "learner/step": float(self.step),
                         "perf/learner_step_s": elapsed, "perf/learner_tokens_per_s": totals["learner/seq_tokens"] / elapsed}

    def _micro_slices(self, rows: int) -> list[slice]:
        """`rows` rows in micro-batches of `micro_batch_size` (the last one maybe shorter)."""
        mbs = self.cfg.micro_batch_size
        return [slice(start, min(start + mbs, rows)) for start in range(0, rows, mbs)]

    def _accumulate(
        self, engine: Any, rows: int, micro_loss: Any
    ) -> tuple[dict[str, float], float]:
        """Run `micro_loss(rows_slice) -> (loss, metrics)` over the micro-batches of `rows` rows (the last
        one shorter when micro_batch_size does not divide `rows`) with gradient accumulation into one
        optimizer step of `engine`; (summed metrics, global grad norm)."""
        engine.train()
        mbs = self.cfg.micro_batch_size
        n_micro = -(-rows // mbs)
        totals: dict[str, float] = {}
        fallback_norm: float | None = None
        for i in range(n_micro):
            engine.set_gradient_accumulation_boundary(i == n_micro - 1)
            loss, metrics = micro_loss(slice(i * mbs, min((i + 1) * mbs, rows)))
            engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if i == n_micro - 1:  # plain ZeRO-0 fp32 does not record the norm; gradients are reduced by now
                fallback_norm = _grad_norm(engine.module) if self.cfg.zero_stage == 0 else None
            engine.step()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = fallback_norm
        return totals, float(grad_norm) if grad_norm is not None else float("nan")


    # ---- weights and checkpoints -----------------------------------------------------------------

    def state_dict_for_rollout(self, copy: bool = True) -> dict[str, Tensor]:
        """Full weights under HF parameter names (rank 0; other ranks return {}): CPU copies, or with
        `copy=False` below ZeRO-3 the parameters themselves (what rank 0 publishes: the publish reads
        them before the next optimizer step).

        Every rank must call it: under ZeRO-3 each parameter is all-gathered in turn (and copied, as
        the gather is released), so peak extra memory is one parameter, not the whole model.
        """
        module = self.engine.module
        zero3 = self.cfg.zero_stage == 3
        copy = copy or zero3
        out: dict[str, Tensor] = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=zero3):
                if self.rank == 0:
                    out[name] = param.detach().to("cpu", copy=True) if copy else param.detach()
        if self.rank == 0:
            persistent = set(module.state_dict().keys())
            for name, buf in module.named_buffers():
                if name in persistent:
                    out[name] = buf.detach().to("cpu", copy=True) if copy else buf.detach()
        return out

    def attach_weights(self, spec: WeightSpec) -> None:
        """Rank 0 becomes the publisher of `spec.transport`; other ranks only take part in gathers."""
        self.close_weights()
        if self.rank == 0:
            self.publisher = make_publisher(spec)

    def join_weight_group(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins a `rendezvous` transport's weight group as its rank 0 (the publisher)."""
        assert self.publisher is not None, "attach_weights first"
        self.publisher.join(host, port, 0, world_size, self.device)  # type: ignore[attr-defined]

    def publish_weights(self, version: int) -> tuple[WeightHandle | None, float]:
        """Publish the current weights as `version` (rank 0; every rank must call it, ZeRO-3 gathers);
        (the handle on rank 0 else None, the seconds the publish took)."""
        start = time.perf_counter()
        state = self.state_dict_for_rollout(copy=False)
        if self.rank != 0:
            return None, time.perf_counter() - start
        if self.publisher is None:
            raise RuntimeError("LearnerWorker.publish_weights: no publisher; call attach_weights(spec) first")
        handle = self.publisher.publish(state, version)
        return handle, time.perf_counter() - start

    def close_weights(self) -> None:
        """Close rank 0's publisher (an `shm` publisher removes its slots)."""
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    def save(self, directory: str) -> None:
        """Exact-resume checkpoint in `directory/deepspeed`; HF export (+ tokenizer) in `directory/hf`."""
        root = Path(directory)
        ds_dir = root / "deepspeed"
        self.engine.save_checkpoint(str(ds_dir), tag=f"step{self.step}", client_state={"step": self.step})
        ds_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), ds_dir / f"rng_rank{self.rank}.pt")
        if self.critic is not None:
            self.critic.save_checkpoint(str(root / "critic"), tag=f"step{self.step}")
        state = self.state_dict_for_rollout()
        if self.rank == 0:
            _export_hf(self.engine.module, state, self.model_dir, root / "hf")
        torch.distributed.barrier()

    def load(self, directory: str) -> None:
        """Restore model, optimizer, LR scheduler, step and this rank's RNG from `save(directory)`."""
        ds_dir = Path(directory) / "deepspeed"
        path, client_state = self.engine.load_checkpoint(
            str(ds_dir), load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"LearnerWorker.load: no DeepSpeed checkpoint under {ds_dir}")
        self.step = int(client_state["step"])
        if self.critic is not None:
            critic_path, _ = self.critic.load_checkpoint(
                str(Path(directory) / "critic"), load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if critic_path is None:
                raise FileNotFoundError(f"LearnerWorker.load: no critic checkpoint under {Path(directory) / 'critic'}")
        rng_file = ds_dir / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))

    def close(self) -> None:
        """Drop the engine. The process group stays: DeepSpeed caches its groups for the life of the
        process, so a later worker in this process (tests) must reuse the same rank and world size."""
        self.engine.destroy()
        del self.engine
        if self.critic is not None:
            self.critic.destroy()
            self.critic = None



def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _grad_norm(module: torch.nn.Module) -> float | None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _pick_loss(name: str) -> Any:
    if name not in LOSSES:
        raise ValueError(f"LearnerConfig.loss: {name!r} is not in learner.algos.LOSSES {sorted(LOSSES)}")
    return LOSSES[name]


def _build_engine(
    cfg: LearnerConfig, model: torch.nn.Module, lr: float, total_steps: int, grad_accum: int, world_size: int
) -> deepspeed.DeepSpeedEngine:
    """`model` under DeepSpeed with AdamW at peak `lr` and the configured schedule (policy or critic)."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.lr_schedule, cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config(cfg, grad_accum, world_size),
        dist_init_required=False,
    )
    return engine


def _policy_model(cfg: LearnerConfig, model_dir: str) -> PreTrainedModel:
    model = MODEL_HEADS[cfg.head](model_dir, cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def reward_model(model_dir: str, seed: int) -> PreTrainedModel:
    """The body of the causal LM in `model_dir` under a new scalar head: a one-label
    `AutoModelForSequenceClassification`, as transformers loads reward models.

    The head is drawn from a generator seeded with `seed` (the same on every rank), N(0, the model's
    `initializer_range`), as transformers would. Its reward is read where transformers reads it: at the
    last token that is not the pad token, so the config's `pad_token_id` is set (the tokenizer's pad
    token, else its eos) and the exported model scores like the one trained.
    """
    from transformers import AutoModelForSequenceClassification

    with warnings.catch_warnings():  # "Some weights ... newly initialized: ['score.weight']" is the point
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = _pad_token_id(model_dir, model.config)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{model_dir}: {type(model).__name__} has no linear `score` head to train as a reward model")
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * std)
    return model  # type: ignore[no-any-return]


# LearnerConfig.head -> the model the learner trains, built from (model_dir, seed).
MODEL_HEADS = {
    "lm": lambda model_dir, seed: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
    "reward": reward_model,
}


def _pad_token_id(model_dir: str, config: Any) -> int | None:
    """The tokenizer's pad token (else its eos) when `model_dir` has a tokenizer, else the config's eos."""
    from transformers import AutoTokenizer

    if any((Path(model_dir) / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def _export_hf(module: PreTrainedModel, state: dict[str, Tensor], model_dir: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(out_dir), state_dict=state)
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.exists() and not (out_dir / name).exists():
            shutil.copy2(src, out_dir / name)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
