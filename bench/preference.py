"""DPO training of Assay against TRL's `DPOTrainer`: one checkpoint, the same pairs, tokens, beta and optimizer.

Assay runs its real stage, `engine.supervised.run_stage` on `compose_config(["experiment=demo",
"stage=dpo", "task=arithmetic_pairs", "model.path=CKPT", ...])` (a local Ray instance, one DeepSpeed
learner actor; the reference log-probabilities scored once before the first step, and counted in its
time). TRL 1.16 runs `DPOTrainer` on the CPU in this process, on exactly the token ids Assay trains on
(a dataset of `prompt_ids`, `chosen_ids`, `rejected_ids` built with `engine.data.preference_batch`'s
tokenisation, handed to a `DPOTrainer` whose own tokenisation is skipped), in the same order
(`train_sampling_strategy="sequential"`), with the same `torch.optim.AdamW` and learning-rate schedule
objects (`optimizers=`), the same beta, batch and steps, and its default reference (a frozen copy of
the model, scored every step). Both use one forward/backward pass per step (micro batch = batch).

Measured for each: pairs/s over training (Assay: the reference scoring plus the sum of `perf/step_s`;
TRL: `on_train_begin` to the last `on_step_end`), start-up apart; the loss of every step (the first
step's is log 2 on both, since the policy is the reference; the later ones check that the two compute
the same maths on the same data: they agree to ~1e-5 while the weights move alike); and, by one
evaluator for both, the held-out preference accuracy of the final weights (the share of held-out pairs
whose implicit reward beta * (log pi - log pi_ref) ranks chosen above rejected) and the held-out greedy
accuracy (`engine.evaluate.heldout_accuracy`). Goal: Assay >= 1.5x TRL's pairs/s at an equal held-out
accuracy.

    python bench/preference.py [--model SFT_DIR] [--steps 40] [--batch-size 64] [--lr 1e-4] [--beta 0.1]
                               [--pairs 1] [--threads 2] [--quick] --out FILE.json

The checkpoint is `--model DIR` (a demo-format SFT export, e.g. runs/demo/sft/final/hf), else found or
built as `bench/trl_compare.py` does. Needs trl: pip install "torch==2.13.0" -e ".[cpu,bench]".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.trl_compare import heldout, starting_checkpoint
from engine.config import AssayConfig, compose_config
from engine.data import preference_batch


def assay_config(args: argparse.Namespace, model_dir: str | None, runs_dir: Path) -> AssayConfig:
    return compose_config([
        "experiment=demo", "stage=dpo", "task=arithmetic_pairs", "name=bench_dpo", f"runs_dir={runs_dir}",
        *([f"model.path={model_dir}"] if model_dir else []), f"steps={args.steps}", "eval_every=0", "progress=false",
        f"learner.batch_size={args.batch_size}", f"learner.micro_batch_size={args.batch_size}",
        f"learner.lr={args.lr}", f"learner.warmup_steps={args.warmup}", f"learner.preference_beta={args.beta}",
        f"learner.threads={args.threads}", f"task.pairs.size={args.size}",
    ])


def run_assay(cfg: AssayConfig) -> dict[str, Any]:
    from engine.supervised import run_stage

    start = time.perf_counter()
    result = run_stage(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "learner/loss" in r]
    seconds = sum(r["perf/step_s"] for r in trained) + trained[0].get("perf/reference_s", 0.0)
    return {"losses": [r["learner/loss"] for r in trained], "train_s": seconds, "wall_s": wall,
            "reference_s": trained[0].get("perf/reference_s", 0.0), "export": str(result.export_dir)}


def run_trl(cfg: AssayConfig, model_dir: str, out_dir: Path) -> dict[str, Any]:
    """TRL's DPOTrainer on the token ids of the pairs Assay's stage draws, in the same order."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from engine.tasks import load_task_source
    from learner.schedule import build_scheduler

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = load_task_source(cfg.task.source, cfg.task, cfg.seed).sample(cfg.learner.batch_size * cfg.steps)
    dataset = Dataset.from_list([_token_ids(task, tokenizer, cfg.max_len) for task in tasks])

    class SameTokens(DPOTrainer):  # the dataset holds Assay's token ids already
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    stamps: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    learner = cfg.learner
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learner.lr, betas=(learner.betas[0], learner.betas[1]),
                                  eps=learner.eps, weight_decay=learner.weight_decay)  # as learner.rank builds it
    scheduler = build_scheduler(optimizer, learner.warmup_steps, cfg.steps, learner.lr_schedule, learner.min_lr_ratio)
    trl_args = DPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=cfg.seed, dataloader_num_workers=0,
        train_sampling_strategy="sequential", per_device_train_batch_size=learner.batch_size,
        gradient_accumulation_steps=1, max_steps=cfg.steps, learning_rate=learner.lr,
        max_grad_norm=learner.max_grad_norm, beta=learner.preference_beta, loss_type=["sigmoid"],
        label_smoothing=learner.preference_label_smoothing, max_length=None, gradient_checkpointing=False,
    )
    trainer = SameTokens(model=model, args=trl_args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()], optimizers=(optimizer, scheduler))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    wall = time.perf_counter() - start
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {"losses": losses, "train_s": stamps[-1] - stamps[0], "wall_s": wall, "state": state,
            "args": {"loss_type": trl_args.loss_type, "beta": trl_args.beta,
                     "precompute_ref_log_probs": trl_args.precompute_ref_log_probs}}


def _token_ids(task: Any, tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    """One pair as the prompt's and each response's token ids, exactly as Assay's batch holds them."""
    batch = preference_batch([task], tokenizer, max_len)
    out: dict[str, list[int]] = {}
    for side in ("chosen", "rejected"):
        ids, mask = batch[f"{side}_input_ids"][0], batch[f"{side}_attention_mask"][0].bool()
        loss = batch[f"{side}_loss_mask"][0].bool()
        out["prompt_ids"] = ids[mask & ~loss].tolist()
        out[f"{side}_ids"] = ids[loss].tolist()
    return out


def pair_accuracy(model_dir: str, state: dict[str, torch.Tensor], cfg: AssayConfig) -> float:
    """The share of held-out pairs whose implicit reward ranks chosen above rejected, for the weights
    `state` (empty: `model_dir`'s own) against `model_dir` as the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.tasks import load_task_source
    from learner.algos import token_logprobs

    tasks = load_task_source(cfg.task.source, cfg.task, cfg.seed).eval_tasks(cfg.task.eval_size)
    batch = preference_batch(tasks, AutoTokenizer.from_pretrained(model_dir), cfg.max_len)

    def margins(model: Any) -> torch.Tensor:
        with torch.no_grad():
            sums = []
            for side in ("chosen", "rejected"):
                logits = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
                sums.append((token_logprobs(logits, batch[f"{side}_input_ids"]) * batch[f"{side}_loss_mask"]).sum(-1))
        return sums[0] - sums[1]

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state:
        policy.load_state_dict(state, strict=False)
    return float((margins(policy) > margins(reference)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the starting SFT export (default: found or built as bench/trl_compare.py does)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--size", type=int, default=2000, help="generated training pairs (task.pairs.size)")
    parser.add_argument("--pairs", type=int, default=1, help="alternating Assay/TRL runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 20-steps-a-stage checkpoint built in a temporary directory")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args()
    for key, value in {"DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    import ray

    torch.set_num_threads(args.threads)
    os.nice(max(0, int(os.environ.get("RAY_worker_niceness", "15")) - os.nice(0)))  # as Ray's actors run
    scratch = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    probe = assay_config(args, None, scratch / "runs")
    model_dir, origin = starting_checkpoint(args.model, probe, args.quick, scratch)
    cfg = assay_config(args, model_dir, scratch / "runs")
    runs = []
    for pair in range(args.pairs):
        assay = run_assay(assay_config(args, model_dir, scratch / f"runs-{pair}"))
        ray.shutdown()  # TRL runs alone
        trl = run_trl(cfg, model_dir, scratch / f"trl-{pair}")
        pairs_total = cfg.steps * cfg.learner.batch_size
        sides = {}
        for name, side, state, export in (("assay", assay, {}, assay["export"]), ("trl", trl, trl["state"], model_dir)):
            source_dir = export if name == "assay" else model_dir
            sides[name] = {
                "pairs_per_s": pairs_total / side["train_s"], "train_s": side["train_s"],
                "startup_s": side["wall_s"] - side["train_s"], "loss_first": side["losses"][0],
                "loss_last": side["losses"][-1], "losses": side["losses"],
                "heldout_accuracy": pair_accuracy(model_dir, state if name == "trl" else _weights(export), cfg),
                "heldout_greedy": heldout(source_dir, state, cfg),
            }
        sides["assay"]["reference_s"] = assay["reference_s"]
        gaps = [abs(a - b) for a, b in zip(sides["assay"]["losses"], sides["trl"]["losses"])]
        runs.append({**sides, "ratio": sides["assay"]["pairs_per_s"] / sides["trl"]["pairs_per_s"],
                     "loss_gap_first": gaps[0], "loss_gap_max_first_5": max(gaps[:5]), "trl_args": trl["args"]})
    result = {
        "assay": runs[-1]["assay"], "trl": runs[-1]["trl"], "runs": runs,
        "assay_vs_trl_pairs_per_s": statistics.median(r["ratio"] for r in runs),
        "settings": {"checkpoint": model_dir, "checkpoint_origin": origin, "steps": cfg.steps,
                     "batch_size": cfg.learner.batch_size, "lr": cfg.learner.lr, "warmup": cfg.learner.warmup_steps,
                     "beta": cfg.learner.preference_beta, "loss": cfg.learner.preference_loss, "pairs": args.size,
                     "heldout_pairs": cfg.task.eval_size, "threads": args.threads, "cpus": os.cpu_count(),
                     "optimizer": f"AdamW betas {list(cfg.learner.betas)} eps {cfg.learner.eps}, "
                                  f"{cfg.learner.lr_schedule} schedule, same objects for both",
                     "heldout_greedy_start": heldout(model_dir, {}, cfg)},
    }
    for r in runs:
        a, t = r["assay"], r["trl"]
        print(f"Assay {a['pairs_per_s']:.1f} pairs/s (reference {a['reference_s']:.1f} s included), TRL "
              f"{t['pairs_per_s']:.1f}: {r['ratio']:.2f}x (goal >= 1.5x); loss step 1 {a['loss_first']:.6f} vs "
              f"{t['loss_first']:.6f}, last {a['loss_last']:.4f} vs {t['loss_last']:.4f} (largest gap over the first "
              f"5 steps {r['loss_gap_max_first_5']:.2e}); held-out preference accuracy {a['heldout_accuracy']:.3f} vs "
              f"{t['heldout_accuracy']:.3f}, greedy {a['heldout_greedy']:.3f} vs {t['heldout_greedy']:.3f} "
              f"(start {result['settings']['heldout_greedy_start']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


def _weights(export: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).state_dict()


if __name__ == "__main__":
    main()
