"""Learner throughput: tokens/s and model-FLOPs utilisation of `LearnerGroup` on this CPU.

Runs ZeRO 0/2/3 with 1 and 2 learner actors (one CPU thread each) on a small Llama, plus the peer:
a bare PyTorch loop (same model, AdamW, same micro-batching, no DeepSpeed, no process group) run in
a one-CPU Ray task like an actor, which shows what DeepSpeed and the learner plumbing cost.

MFU = 6 * N * tokens/s / peak, where N counts every parameter that takes part in a matmul (all but
the input embedding table) and peak is a large fp32 `torch.matmul` measured here on ONE thread,
times the number of actors (each actor is pinned to one thread by Ray's num_cpus=1); the peak is the
best of measurements before and after the runs, since this machine is shared. Attention's
T^2 FLOPs are not counted (small at T=128), as in the usual 6ND estimate.

    python bench/learner.py [--out FILE.json] [--steps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import torch

SEQ = 128
BATCH = 16
MICRO = 4
VOCAB = 4096


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """Best-of-`reps` fp32 FLOP/s of an n x n matmul on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(threads)
    return 2 * n**3 / best


def build_model(out_dir: Path) -> int:
    """Save a small Llama to `out_dir`; return its matmul parameter count N."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    embedding_table = model.model.embed_tokens.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding_table


def make_batch(rows: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    loss_mask = attention_mask.clone()
    loss_mask[:, 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def median_tokens_per_s(step_fn: Callable[[dict[str, torch.Tensor]], object], steps: int) -> float:
    """BATCH x SEQ tokens over the median step time of `steps` timed steps after one warm-up step.

    The median, not the mean: this machine is shared, and a neighbour's burst should not move it.
    """
    step_fn(make_batch(BATCH, 0))
    times = []
    for step in range(steps):
        batch = make_batch(BATCH, step + 1)
        start = time.perf_counter()
        step_fn(batch)
        times.append(time.perf_counter() - start)
    return BATCH * SEQ / statistics.median(times)


def bench_group(model_dir: str, zero_stage: int, actors: int, steps: int) -> float:
    """Tokens/s of a LearnerGroup."""
    from learner.config import LearnerConfig
    from learner.group import LearnerGroup

    cfg = LearnerConfig(zero_stage=zero_stage, lr=1e-4, batch_size=BATCH, micro_batch_size=MICRO)
    group = LearnerGroup(cfg, model_dir, world_size=actors, total_steps=steps + 1)
    try:
        return median_tokens_per_s(group.train_step, steps)
    finally:
        group.shutdown()


def bench_plain_torch(model_dir: str, steps: int) -> float:
    """The peer: HF model + AdamW + the same micro-batching, no DeepSpeed, one thread (runs in a Ray task)."""
    from transformers import AutoModelForCausalLM

    from learner.algos import nll_loss, token_logprobs

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict[str, torch.Tensor]) -> None:
        num_tokens = int(batch["loss_mask"].sum())
        for start in range(0, BATCH, MICRO):
            rows = slice(start, start + MICRO)
            logits = model(
                input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]
            ).logits
            loss, _ = nll_loss(
                token_logprobs(logits, batch["input_ids"][rows]), batch["loss_mask"][rows], num_tokens
            )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_tokens_per_s(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--steps", type=int, default=7, help="timed optimizer steps per configuration")
    args = parser.parse_args()

    from engine.ray_cluster import init_ray

    load_before = os.getloadavg()
    peak = matmul_peak_flops()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(Path(tmp))
        flops_per_token = 6 * n_params
        init_ray(num_cpus=2)
        import ray

        plain = ray.get(ray.remote(num_cpus=1)(bench_plain_torch).remote(tmp, args.steps))
        rows.append({"system": "plain torch (peer)", "zero": "-", "actors": 1, "tokens_per_s": plain})
        for zero_stage in (0, 2, 3):
            for actors in (1, 2):
                tps = bench_group(tmp, zero_stage, actors, args.steps)
                rows.append(
                    {
                        "system": "assay LearnerGroup",
                        "zero": zero_stage,
                        "actors": actors,
                        "tokens_per_s": tps,
                    }
                )
    peak = max(peak, matmul_peak_flops())  # best of a measurement before and after: less neighbour noise
    for row in rows:
        row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * row["actors"])

    print(
        f"model: Llama 4x256, vocab {VOCAB}, N = {n_params / 1e6:.2f} M matmul params; batch {BATCH} x {SEQ} tokens,"
    )
    print(f"micro-batch {MICRO}, fp32; 1-thread fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"tokens/s = median of {args.steps} timed steps; MFU denominator = peak x actors")
    print(f"load average before / after: {load_before} / {os.getloadavg()} on {os.cpu_count()} CPUs")
    print(f"{'system':<22}{'ZeRO':>5}{'actors':>8}{'tokens/s':>11}{'MFU':>8}")
    for row in rows:
        print(
            f"{row['system']:<22}{row['zero']!s:>5}{row['actors']:>8}{row['tokens_per_s']:>11.0f}{row['mfu']:>8.1%}"
        )
    if args.out:
        result = {
            "n_params": n_params,
            "seq": SEQ,
            "batch": BATCH,
            "micro_batch": MICRO,
            "peak_flops_1thread": peak,
            "steps": args.steps,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
