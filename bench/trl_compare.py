"""GRPO training of Assay against TRL's `GRPOTrainer`: one checkpoint, prompts, reward and set of numbers.

Assay runs its real RL stage, `engine.rl.run_rl` on `compose_config(["experiment=demo", "stage=rl",
"model.path=CKPT", ...])` (a local Ray instance, one DeepSpeed learner actor, one vLLM rollout actor, a
verifier pool of process workers), with the GRPO numbers of configs/algo/grpo.yaml. TRL 1.16 runs
`GRPOTrainer` on the CPU with `use_vllm=False` (transformers `generate` in this process), every setting the
two share read from that same composed config, the same `torch.optim.AdamW` and learning-rate schedule
(`learner.schedule.build_scheduler`, passed as `optimizers=`), the same task stream in the same order (a
dataset with the gold answer as the `answer` column, `shuffle_dataset=False`), and a reward function that
calls `verifiers.math.MathVerifier().verify(text, task)` in-process. `settings_rows` lists every setting
with both values and, where they differ, why; the result's `settings` holds it.

Measured for each: samples/s and generated tokens/s (to and including eos) over the training steps --
Assay: the sum of `perf/step_s` (rollout, scoring, the update, the weight sync; evaluations excluded);
TRL: `on_train_begin` to `on_train_end` of its own loop -- with start-up (Ray, actors, vLLM; TRL's
trainer) reported apart; `reward`: the mean train reward of the last `last` RL steps; and the held-out
greedy accuracy of the starting and the final weights on `task.eval_size` held-out sums, by one evaluator
for both (`engine.evaluate.heldout_accuracy`: transformers greedy decoding, the math verifier). The two
alternate, A B A B (`--pairs`, default 2, from the same checkpoint), so a load spike on a shared machine
lands in one pair rather than on one side; the ratio is reported per pair, over the whole run and on the
median step, with the load average before each run, and summarised as the median over pairs. TRL runs
alone (Ray shut down) in this process, niced to the priority Ray gives Assay's actors (15), so that other
jobs on a shared machine slow both alike.

The starting checkpoint (`starting_checkpoint`) must be one the reward can move: the demo's flawed-teacher
SFT export (about 35% held-out), from `--model DIR`, else `runs/demo/sft/final/hf` of an earlier `assay demo`
on the same task, else `runs/bench_rl/sft/final/hf` of an earlier bench run, else built now by the demo's
first three stages (`engine.cli.DEMO_STAGES`: pretrain, SFT on clean sums to 90%, SFT on the 40%-right
teacher) into `runs/bench_rl/` (a few minutes on 2 cores; `--quick` builds a 20-steps-a-stage one in a
temporary directory instead).

Needs trl: pip install "torch==2.13.0" -e ".[cpu,bench]"
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import AssayConfig, compose_config
from learner.config import skips_zero_advantage

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "bench_grpo"
CHECKPOINT_RUN = "bench_rl"
# Our config -> TRL's, where TRL has a counterpart (anything else is refused, not approximated).
TRL_LOSS_TYPES = {"seq-mean-token-mean": "grpo", "token-mean": "bnpo", "seq-mean-token-sum-norm": "dr_grpo"}
TRL_SCALE_REWARDS = {"grpo": "group", "dr_grpo": "none"}


@dataclass(frozen=True)
class GrpoBench:
    """The numbers both systems get; every other setting comes from `experiment=demo` + configs/algo/grpo.yaml."""

    steps: int
    prompts: int
    n: int
    max_tokens: int
    lr: float
    warmup_steps: int
    batch_size: int
    threads: int
    last: int
    overrides: tuple[str, ...] = ()


def assay_config(bench: GrpoBench, model_dir: str | None, runs_dir: Path) -> AssayConfig:
    """The RL stage's config: the demo experiment from `model_dir`, at the bench's numbers."""
    return compose_config([
        "experiment=demo", "stage=rl", f"name={RUN_NAME}", f"runs_dir={runs_dir}",
        *([f"model.path={model_dir}"] if model_dir else []),
        f"steps={bench.steps}", "eval_every=0", "progress=false",
        f"rl.prompts_per_step={bench.prompts}", f"rollout.n={bench.n}", f"rollout.max_tokens={bench.max_tokens}",
        f"rollout.threads={bench.threads}", f"learner.threads={bench.threads}",
        f"learner.lr={bench.lr}", f"learner.warmup_steps={bench.warmup_steps}",
        # one forward/backward pass per minibatch, as TRL's per_device_train_batch_size does
        f"learner.batch_size={bench.batch_size}", f"learner.micro_batch_size={bench.batch_size}",
        *bench.overrides,
    ])


def starting_checkpoint(model: str | None, cfg: AssayConfig, quick: bool, scratch: Path) -> tuple[str, str]:
    """(checkpoint directory, how it was obtained); see the module docstring for the order."""
    if model:
        return str(Path(model).resolve()), "--model"
    for run in ("demo", CHECKPOINT_RUN):
        export = REPO / "runs" / run / "sft" / "final" / "hf"
        if export.is_dir() and _same_task(export.parents[1] / "config.yaml", cfg):
            return str(export), f"reused runs/{run}/sft/final/hf"
    runs_dir = scratch if quick else REPO / "runs"
    start = time.perf_counter()
    export = build_checkpoint(runs_dir, quick)
    return str(export), f"built by DEMO_STAGES[:3]{' (20 steps each)' if quick else ''} in {time.perf_counter() - start:.0f} s"


def _same_task(config_yaml: Path, cfg: AssayConfig) -> bool:
    """Whether the run that wrote `config_yaml` trained on the task `cfg` asks for (teacher aside)."""
    from omegaconf import OmegaConf

    if not config_yaml.is_file():
        return False
    task = OmegaConf.to_container(OmegaConf.load(config_yaml).task)
    ours = OmegaConf.to_container(OmegaConf.structured(cfg.task))
    assert isinstance(task, dict) and isinstance(ours, dict)
    for t in (task, ours):
        t["arithmetic"].pop("teacher_accuracy", None)
    return task["source"] == ours["source"] and task["arithmetic"] == ours["arithmetic"]


def build_checkpoint(runs_dir: Path, quick: bool) -> Path:
    """The demo's pretrain -> clean SFT -> flawed-teacher SFT, through the CLI's own stage runner."""
    from engine.cli import DEMO_STAGES, run_stage

    for stage, defaults in DEMO_STAGES[:3]:
        short = ("steps=20", "eval_every=0") if quick else ()
        cfg = compose_config([*defaults, f"stage={stage}", "experiment=demo", f"name={CHECKPOINT_RUN}",
                              f"runs_dir={runs_dir}", "progress=false", *short])
        print(f"[bench] building the starting checkpoint: {cfg.stage_dir or cfg.stage}, {cfg.steps} steps")
        run_stage(cfg)
    return runs_dir / CHECKPOINT_RUN / "sft" / "final" / "hf"


def run_assay(cfg: AssayConfig) -> dict[str, Any]:
    """Train with `engine.rl.run_rl`; per-step numbers from the run's metrics.jsonl."""
    from engine.rl import run_rl

    start = time.perf_counter()
    result = run_rl(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [
        {"seconds": r["perf/step_s"], "samples": cfg.rl.prompts_per_step * cfg.rollout.n,
         "tokens": round(r["perf/tokens_per_s"] * r["perf/step_s"]), "reward": r["rollout/reward_mean"]}
        for r in rows if r["step"] >= 1
    ]
    parts = {key: sum(r[f"perf/{key}_s"] for r in rows if r["step"] >= 1) for key in ("rollout", "verify", "learn", "sync")}
    own_eval = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}  # vLLM greedy, the stage's own
    trained = [r for r in rows if r["step"] >= 1]
    skipped = sum(r.get("learner/skipped_rows_frac", 0.0) for r in trained) / max(len(trained), 1)
    return {"steps": steps, "wall_s": wall, "parts_s": parts, "export": str(result.export_dir),
            "skipped_rows_frac": skipped,
            "own_eval_accuracy": {"first": own_eval.get(0), "last": own_eval.get(cfg.steps)}}


def trl_arguments(cfg: AssayConfig, out_dir: Path) -> Any:
    """`GRPOConfig` with every setting that has a counterpart in `cfg` taken from it."""
    from trl import GRPOConfig

    from engine.rl import optimizer_steps

    learner = cfg.learner
    refused = [f"{key}={value!r}" for key, value, ok in (
        ("learner.aggregation", learner.aggregation, learner.aggregation in TRL_LOSS_TYPES),
        ("rl.advantage", cfg.rl.advantage, cfg.rl.advantage in TRL_SCALE_REWARDS),
        ("learner.policy_loss", learner.policy_loss, learner.policy_loss == "ppo_clip"),
        ("learner.kl_estimator", learner.kl_estimator, learner.kl_estimator == "k3" or learner.kl_coef == 0),
        ("learner.tis_cap", learner.tis_cap, learner.tis_cap is None),
        ("learner.precision", learner.precision, learner.precision == "fp32"),
        ("rl.dynamic_sampling", cfg.rl.dynamic_sampling, not cfg.rl.dynamic_sampling),
        ("rl.overlong_buffer", cfg.rl.overlong_buffer, cfg.rl.overlong_buffer == 0),
    ) if not ok]
    if refused:
        raise ValueError(f"no TRL GRPOTrainer counterpart for {', '.join(refused)}")
    per_step = cfg.rl.prompts_per_step * cfg.rollout.n
    return GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, use_vllm=False, dataloader_num_workers=0,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=cfg.seed,
        gradient_checkpointing=False,  # TRL's default is on; ours off
        shuffle_dataset=False,  # the dataset is already the task stream in Assay's order
        per_device_train_batch_size=learner.batch_size, gradient_accumulation_steps=1,
        steps_per_generation=per_step // learner.batch_size, num_generations=cfg.rollout.n,
        max_steps=optimizer_steps(cfg), max_completion_length=cfg.rollout.max_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=0,
        learning_rate=learner.lr, max_grad_norm=learner.max_grad_norm,
        loss_type=TRL_LOSS_TYPES[learner.aggregation], scale_rewards=TRL_SCALE_REWARDS[cfg.rl.advantage],
        beta=learner.kl_coef, epsilon=learner.clip_low, epsilon_high=learner.clip_high,
        num_iterations=learner.ppo_epochs, mask_truncated_completions=cfg.rl.mask_truncated,
    )


def run_trl(cfg: AssayConfig, model_dir: str, out_dir: Path) -> dict[str, Any]:
    """Train TRL's GRPOTrainer on the prompts Assay's stage draws, in the same order; return its numbers
    and final weights (`state`). Start-up counts from before trl's import (which imports vLLM)."""
    start = time.perf_counter()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from engine.rl import optimizer_steps
    from engine.tasks import load_task_source
    from learner.schedule import build_scheduler
    from verifiers.base import Task
    from verifiers.math import MathVerifier

    tasks = load_task_source(cfg.task.source, cfg.task, cfg.seed).sample(cfg.rl.prompts_per_step * cfg.steps)
    dataset = Dataset.from_list([{"prompt": t.prompt, "answer": t.reference} for t in tasks])
    verifier = MathVerifier(**cfg.verifier.options.get("math", {}))
    calls: list[dict[str, float]] = []  # one per generation batch, i.e. per RL step

    def math_reward(completions: list[str], answer: list[str], completion_ids: list[list[int]],
                    **_: Any) -> list[float | None]:
        scores = [verifier.verify(text, Task(id="trl", prompt="", reference=gold, verifier="math")).score
                  for text, gold in zip(completions, answer)]
        judged = [s for s in scores if s is not None]
        calls.append({"samples": len(scores), "tokens": sum(len(ids) for ids in completion_ids),
                      "reward": sum(judged) / max(1, len(judged))})
        return scores

    stamps: list[float] = []  # on_train_begin, then the end of every optimizer step

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    args = trl_arguments(cfg, out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    learner = cfg.learner
    optimizer = torch.optim.AdamW(model.parameters(), lr=learner.lr, betas=(learner.betas[0], learner.betas[1]),
                                  eps=learner.eps, weight_decay=learner.weight_decay)  # as learner.worker builds it
    scheduler = build_scheduler(optimizer, learner.warmup_steps, optimizer_steps(cfg), learner.lr_schedule,
                                learner.min_lr_ratio)
    trainer = GRPOTrainer(model=model, reward_funcs=[math_reward], args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()],
                          optimizers=(optimizer, scheduler))
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the bench prints its own table
    trainer.train()
    wall = time.perf_counter() - start
    per_rl_step = args.steps_per_generation * args.num_iterations  # optimizer steps per generation batch
    ends = stamps[::per_rl_step]  # train begin, then the end of each RL step
    steps = [{**call, "seconds": b - a} for call, a, b in zip(calls, ends, ends[1:])]
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {"steps": steps, "wall_s": wall, "state": state, "args": args, "lr_last": scheduler.get_last_lr()[0]}


def summary(steps: list[dict[str, float]], wall_s: float, last: int) -> dict[str, Any]:
    """samples/s and tokens/s over all steps, the last steps' reward; and samples/s of the median step,
    which a shared machine's bursts of load move less."""
    seconds = sum(s["seconds"] for s in steps)
    tail = steps[-last:]
    return {
        "samples_per_s": sum(s["samples"] for s in steps) / seconds,
        "tokens_per_s": sum(s["tokens"] for s in steps) / seconds,
        "reward": sum(s["reward"] for s in tail) / len(tail),
        "samples_per_s_median_step": statistics.median(s["samples"] / s["seconds"] for s in steps),
        "reward_first": steps[0]["reward"],
        "train_s": seconds,
        "startup_and_eval_s": wall_s - seconds,
        "steps": len(steps),
        "reward_per_step": [s["reward"] for s in steps],
        "seconds_per_step": [s["seconds"] for s in steps],
    }


def heldout(model_dir: str, state: dict[str, torch.Tensor], cfg: AssayConfig) -> float:
    """Greedy accuracy of `model_dir` with `state` loaded, on the stage's held-out tasks."""
    from transformers import AutoTokenizer

    from engine.evaluate import heldout_accuracy
    from engine.tasks import load_task_source

    tasks = load_task_source(cfg.task.source, cfg.task, cfg.seed).eval_tasks(cfg.task.eval_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return heldout_accuracy(Path(model_dir), state, tokenizer, tasks, cfg.rollout.max_tokens)["eval/accuracy"]


def settings_rows(cfg: AssayConfig, trl_args: Any, model_dir: str) -> list[dict[str, str]]:
    """(setting, Assay, TRL, note) for the table and the JSON; a non-empty note says why they differ."""
    learner, rl, rollout = cfg.learner, cfg.rl, cfg.rollout
    schedule = (f"AdamW betas {list(learner.betas)} eps {learner.eps} wd {learner.weight_decay}; "
                f"{learner.lr_schedule} to {learner.min_lr_ratio} x lr, warmup {learner.warmup_steps}")
    rows = [
        ("checkpoint", model_dir, "same", ""),
        ("prompts", f"{rl.prompts_per_step} per step, task stream seed {cfg.seed}", "same tasks, same order", ""),
        ("G (samples per prompt)", str(rollout.n), f"num_generations {trl_args.num_generations}", ""),
        ("max new tokens", str(rollout.max_tokens), f"max_completion_length {trl_args.max_completion_length}", ""),
        ("sampling", f"temperature {rollout.temperature}, top_p {rollout.top_p}",
         f"temperature {trl_args.temperature}, top_p {trl_args.top_p}, top_k 0", ""),
        ("RL steps (generation batches)", str(cfg.steps), "same", ""),
        ("optimizer steps", f"{trl_args.max_steps} (batch_size {learner.batch_size}, micro {learner.micro_batch_size})",
         (f"max_steps {trl_args.max_steps} (per_device_train_batch_size {trl_args.per_device_train_batch_size}, "
          f"steps_per_generation {trl_args.steps_per_generation})"), ""),
        ("learning rate", f"{learner.lr}", "same", ""),
        ("optimizer, schedule", schedule, "the same objects (optimizers=)", ""),
        ("max grad norm", str(learner.max_grad_norm), str(trl_args.max_grad_norm), ""),
        ("advantage", f"{rl.advantage}: (r - mean) / (std + 1e-6), unbiased std",
         f"scale_rewards={trl_args.scale_rewards}: (r - mean) / (std + 1e-4)",
         "epsilon of the std division (only matters for near-uniform groups)"),
        ("policy loss", f"{learner.policy_loss} clip [{learner.clip_low}, {learner.clip_high}]",
         f"epsilon {trl_args.epsilon}, epsilon_high {trl_args.epsilon_high}", ""),
        ("aggregation", learner.aggregation, f"loss_type={trl_args.loss_type}", ""),
        ("KL to reference", f"kl_coef {learner.kl_coef}, {learner.kl_estimator}", f"beta {trl_args.beta} (k3)", ""),
        ("epochs per batch", f"ppo_epochs {learner.ppo_epochs}", f"num_iterations {trl_args.num_iterations}", ""),
        ("precision", learner.precision, "fp32 (bf16=False)", ""),
        ("reward", "math verifier, VerifierPool processes in a Ray actor", "MathVerifier().verify in-process",
         "by design: the verifier pool is Assay's"),
        ("rollout", f"{rollout.backend} actor, weights synced each step ({rollout.weight_sync})",
         "transformers generate in the trainer (use_vllm=False)", "by design: the system under test"),
        ("old logprobs", "a no-grad forward over the step's batch" if learner.old_logprobs == "learner"
         else "the rollout's own logprobs (learner.old_logprobs=rollout; no forward)",
         "one forward per generation batch (skipped when it is one optimizer step)", "implementation"),
        ("zero-advantage rows", "left out of forward/backward (learner.skip_zero_advantage, no KL term)"
         if skips_zero_advantage(learner) else "trained (an in-loss KL term or a critic reads them)",
         "trained", "implementation (the same gradient)"),
        ("torch threads", f"learner {learner.threads} + rollout {rollout.threads}, taking turns",
         f"{torch.get_num_threads()} in one process", "each side uses the 2 cores"),
    ]
    return [{"setting": s, "assay": a, "trl": t, "note": n} for s, a, t, n in rows]


def compare(bench: GrpoBench, model: str | None, quick: bool, scratch: Path, pairs: int = 2) -> dict[str, Any]:
    """`pairs` alternating runs from one checkpoint, Assay then TRL each time (A B A B ...), so a load
    spike on a shared machine hits one pair rather than one side; the result in the JSON shape: each
    side's numbers per pair, the load average around each run, and per pair the ratio on the whole run
    and on the median step."""
    import ray

    torch.set_num_threads(bench.threads)
    # Ray gives Assay's actors niceness 15 (RAY_worker_niceness); TRL runs in this process, so it gets the
    # same, and other jobs on a shared machine take CPU from both alike.
    os.nice(max(0, int(os.environ.get("RAY_worker_niceness", "15")) - os.nice(0)))
    probe = assay_config(bench, None, scratch / "runs")  # for the task a reused checkpoint must match
    model_dir, origin = starting_checkpoint(model, probe, quick, scratch)
    cfg = assay_config(bench, model_dir, scratch / "runs")
    start_accuracy = heldout(model_dir, {}, cfg)
    runs: list[dict[str, Any]] = []
    trl_args = None
    for pair in range(pairs):
        load = [os.getloadavg()[0]]
        assay = run_assay(assay_config(bench, model_dir, scratch / f"runs-{pair}"))
        ray.shutdown()  # TRL runs alone on the machine
        load.append(os.getloadavg()[0])
        trl = run_trl(cfg, model_dir, scratch / f"trl-{pair}")
        load.append(os.getloadavg()[0])
        trl_args = trl["args"]
        a = {**summary(assay["steps"], assay["wall_s"], bench.last), "heldout_greedy": heldout(assay["export"], {}, cfg),
             "parts_s": assay["parts_s"], "skipped_rows_frac": assay["skipped_rows_frac"],
             "own_eval_accuracy": assay["own_eval_accuracy"]}
        t = {**summary(trl["steps"], trl["wall_s"], bench.last), "heldout_greedy": heldout(model_dir, trl["state"], cfg),
             "lr_last": trl["lr_last"]}
        runs.append({"assay": a, "trl": t, "load_average": {"before_assay": load[0], "before_trl": load[1],
                                                             "after_trl": load[2]},
                     "ratio_whole_run": a["samples_per_s"] / t["samples_per_s"],
                     "ratio_median_step": a["samples_per_s_median_step"] / t["samples_per_s_median_step"]})
    return {
        "pairs": runs,
        "assay_vs_trl_samples_per_s": statistics.median(r["ratio_whole_run"] for r in runs),
        "assay_vs_trl_samples_per_s_median_step": statistics.median(r["ratio_median_step"] for r in runs),
        "settings": {
            "checkpoint": model_dir, "checkpoint_origin": origin, "heldout_greedy_start": start_accuracy,
            "heldout_tasks": cfg.task.eval_size, "reward_last_steps": bench.last, "steps": cfg.steps,
            "prompts": cfg.rl.prompts_per_step, "n": cfg.rollout.n, "max_tokens": cfg.rollout.max_tokens,
            "rollout_backend": cfg.rollout.backend,
            "lr": cfg.learner.lr, "batch_size": cfg.learner.batch_size, "threads": bench.threads,
            "cpus": os.cpu_count(), "pairs": pairs,
            "assay_overrides": list(bench.overrides),
            "table": settings_rows(cfg, trl_args, model_dir),
        },
    }


def print_comparison(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(f"GRPO, {s['steps']} steps of {s['prompts']} prompts x G={s['n']}, max {s['max_tokens']} new tokens, "
          f"lr {s['lr']}, minibatch {s['batch_size']}; checkpoint {s['checkpoint']} ({s['checkpoint_origin']}); "
          f"{s['pairs']} alternating pairs (Assay, then TRL) on {s['cpus']} CPUs")
    print()
    print("| setting | Assay | TRL GRPOTrainer | differs because |")
    print("|---|---|---|---|")
    for row in s["table"]:
        print(f"| {row['setting']} | {row['assay']} | {row['trl']} | {row['note']} |")
    print()
    print(f"| pair | GRPO training | load avg before | samples/s | samples/s, median step | tokens/s | train s "
          f"| start-up + eval s | reward step 1 | reward last {s['reward_last_steps']} "
          f"| held-out greedy (start {s['heldout_greedy_start']:.3f}) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    assay_name = f"Assay ({s['rollout_backend']} rollout, DeepSpeed learner)"
    for i, pair in enumerate(result["pairs"], 1):
        for name, key, load in ((assay_name, "assay", "before_assay"), ("TRL 1.16 GRPOTrainer", "trl", "before_trl")):
            r = pair[key]
            print(f"| {i} | {name} | {pair['load_average'][load]:.2f} | {r['samples_per_s']:.0f} "
                  f"| {r['samples_per_s_median_step']:.0f} | {r['tokens_per_s']:.0f} | {r['train_s']:.1f} "
                  f"| {r['startup_and_eval_s']:.1f} | {r['reward_first']:.3f} | {r['reward']:.3f} "
                  f"| {r['heldout_greedy']:.3f} |")
    print()
    for i, pair in enumerate(result["pairs"], 1):
        parts = pair["assay"]["parts_s"]
        print(f"pair {i}: Assay {pair['ratio_whole_run']:.2f}x TRL samples/s over the run, "
              f"{pair['ratio_median_step']:.2f}x on the median step; Assay's train seconds: "
              + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
              + f"; zero-advantage rows left out: {pair['assay']['skipped_rows_frac']:.0%}")
    print(f"median over pairs: {result['assay_vs_trl_samples_per_s']:.2f}x over the run, "
          f"{result['assay_vs_trl_samples_per_s_median_step']:.2f}x on the median step (goal: >= 1.5x on both)")
