"""Our RL side against peers, in one run: rollout throughput, weight-sync time, and GRPO training against TRL.

(a) Rollout: the same P arithmetic prompts x n samples (temperature 1, `max_tokens` M, stopping at eos)
    through plain transformers `model.generate(do_sample=True)` in this process (one left-padded
    batch of P x n rows), our `hf` backend and our `vllm` backend (each a `RolloutGroup` of one
    `RolloutActor`, as the RL loop runs them; seeded sampling, as the loop asks for). Generated tokens
    are counted as produced (up to and including eos). Goal: the default backend (`vllm`) >= 1x the peer.
(b) Weight sync: a publisher's `publish(state, version)` and `RolloutGroup.update_weights` -- what
    each RL step does after training (there learner rank 0 publishes; here this process does, with the
    same code): publish (checksum + write), fetch in the actor (read + verify), load into vLLM in place --
    through the `shm` transport (handle handed over by the socket doorbell, the default, and by a
    Ray call, `rollout.weight_notify=ray`) and the `ray` transport, against the peer `model.load_state_dict(state)` into a
    same-shaped model in this process (an in-place copy into a model that serves, the least a weight
    update can do; `{k: v.clone()}` is printed too). Goal: <= 2x the peer.

Every system uses the same torch thread count (`--threads`, default 2 as the demo runs): the actors
get it as `rollout.threads` (set before the backend starts), this process sets it for the peer.
The default model is the demo's (configs/experiment/demo.yaml: Llama 4x128, 4 heads, MLP 512, ~1 M
params; max_tokens 12). Repeats are interleaved (peer, hf, vllm, peer, ...) and the median is
reported, because this machine is shared; every system is warmed up with one full pass first.
Engine start-up is reported apart.

(c) GRPO training (bench/trl_compare.py): Assay's RL stage (`engine.rl.run_rl` on a composed
    `experiment=demo stage=rl` config) against TRL's `GRPOTrainer` (CPU, `use_vllm=False`), one after the
    other from the same SFT checkpoint, on the same prompts in the same order, the same reward (our `math`
    verifier, in-process for TRL), G, max tokens, learning rate, optimizer, schedule, minibatch and number of
    steps; samples/s, tokens/s, the mean train reward of the last `--last` steps and the held-out greedy
    accuracy of the final weights, with a table of every setting and where the two differ. Goal: Assay
    >= 2x TRL's samples/s at an equal or better reward. The checkpoint is `--model DIR`, else the demo's
    flawed-teacher SFT export of an earlier `assay demo` (runs/demo/sft/final/hf), else one built now by
    the demo's first three stages into runs/bench_rl/ and reused by later runs (see trl_compare).
    Needs the bench extra: pip install "torch==2.13.0" -e ".[cpu,bench]"; without trl a full run skips (c).

    python bench/rl.py [--quick] [--repeats 3] [--threads 2] [--hidden 256 --layers 4 --heads 4
                       --intermediate 1024] [--model DIR] [--out FILE.json]         (a), (b) and (c)
    python bench/rl.py --trl [--model SFT_DIR] [--steps 20] [--lr 3e-5] [--batch-size 128]
                       [--assay-override KEY=VALUE ...] --out FILE.json               (c) only
    python bench/rl.py --no-trl ...                                                   (a) and (b) only

`--out` writes one JSON: (a) under "rollout", (b) under "sync" (with "args", "startup", ...), and (c) as
{"assay": {"samples_per_s", "tokens_per_s", "reward", "heldout_greedy", ...}, "trl": {...},
"settings": {..., "table": [...]}}. `--model` is the served model of (a)/(b) and the starting checkpoint
of (c) (a demo-format SFT export); without it (a)/(b) build a random tiny Llama.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from engine.ray_cluster import set_process_env

set_process_env()  # before transformers/vLLM are imported, here and (via Ray) in the actors

import torch


def build_model(out_dir: Path, hidden: int, layers: int, heads: int, intermediate: int) -> str:
    """A Llama as the engine builds it (BPE on the arithmetic corpus), of the given size."""
    from engine.models import ModelConfig, prepare_model_dir
    from engine.tasks.arithmetic import ArithmeticSource

    cfg = ModelConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
    )
    return str(prepare_model_dir(cfg, ArithmeticSource(seed=0).corpus(300), out_dir))


def timed(fn: Callable[[], Any], times: list[float]) -> Any:
    """Run `fn` once, append its seconds to `times`, return its result."""
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
    return result


class PlainGenerate:
    """The rollout peer: `model.generate(do_sample=True)` over every prompt x n in one left-padded batch."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rollout.hf_backend import _eos_ids

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.eos_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, max_tokens: int) -> int:
        """Generated tokens (to and including eos) of `n` samples of each prompt."""
        from rollout.prompts import encode_prompt

        rows = [encode_prompt(self.tokenizer, p) for p in prompts for _ in range(n)]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])  # (P*n, W)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (P*n, W)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        new = out[:, width:]  # (P*n, <=M): after eos a row is padded
        is_eos = torch.isin(new, torch.tensor(sorted(self.eos_ids)))  # (P*n, <=M)
        after_eos = (is_eos.cumsum(1) - is_eos.int()) > 0  # positions past a row's first eos
        return int((~after_eos).sum())


def bench_rollout(
    model_dir: str, groups: dict[str, Any], prompts: list[str], n: int, max_tokens: int, repeats: int
) -> list[dict[str, Any]]:
    """Generated tokens/s of the peer and each group, interleaved repeats, medians."""
    from rollout.types import Sampling
    from verifiers.base import Task

    tasks = [Task(id=f"bench-{i}", prompt=p, reference="", verifier="math") for i, p in enumerate(prompts)]
    peer = PlainGenerate(model_dir)
    runs: dict[str, Callable[[int], int]] = {
        "plain model.generate (peer)": lambda rep: peer.generate(prompts, n, max_tokens),
    }
    for name, group in groups.items():

        def run(rep: int, group: Any = group) -> int:
            sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=1000 + rep)
            return sum(len(r.response_ids) for r in group.generate(tasks, n, sampling))

        runs[name] = run
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up: one full pass each
        run(-1)
    for rep in range(repeats):
        for name, run in runs.items():
            tokens[name].append(timed(lambda run=run, rep=rep: run(rep), times[name]))
    rows = []
    for name in runs:
        rates = [t / s for t, s in zip(tokens[name], times[name])]
        rows.append(
            {
                "system": name,
                "tokens": statistics.median(tokens[name]),
                "seconds": statistics.median(times[name]),
                "tokens_per_s": statistics.median(rates),
                "runs_tokens_per_s": rates,
            }
        )
    for row in rows:
        row["vs_peer"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def perturbed_state(model: Any, seed: int) -> dict[str, torch.Tensor]:
    """A 'new version' as the learner publishes it: every parameter (HF names, CPU), slightly moved."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (p.detach() + 0.01 * torch.randn(p.shape, generator=gen)).contiguous()
        for name, p in model.named_parameters()
    }


def bench_weight_sync(model_dir: str, groups: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    """Seconds of `update_weights` per transport against in-process copies, interleaved, medians."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    states = [perturbed_state(model, seed) for seed in range(2)]  # alternate: each update changes weights
    nbytes = sum(t.numel() * t.element_size() for t in states[0].values())

    def load_state_dict(rep: int) -> dict[str, float]:
        with torch.no_grad():
            target.load_state_dict(states[rep % 2], strict=False)  # strict=False: a tied lm_head is absent
        return {}

    def clone(rep: int) -> dict[str, float]:
        {k: v.clone() for k, v in states[rep % 2].items()}
        return {}

    runs: dict[str, Callable[[int], dict[str, float]]] = {
        "model.load_state_dict (peer)": load_state_dict,
        "{k: v.clone()}": clone,
    }
    from rollout.group import local_publisher

    versions = {name: 0 for name in groups}
    publishers = {name: local_publisher(group) for name, group in groups.items()}
    for name, group in groups.items():

        def update(rep: int, name: str = name, group: Any = group) -> dict[str, float]:
            versions[name] += 1
            publisher = publishers[name]
            return group.update_weights(lambda v: publisher.publish(states[rep % 2], v), versions[name])

        runs[name] = update
    times: dict[str, list[float]] = {name: [] for name in runs}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up
        run(1)
    for rep in range(repeats):
        for name, run in runs.items():
            parts[name].append(timed(lambda run=run, rep=rep: run(rep), times[name]))
    peer_s = statistics.median(times["model.load_state_dict (peer)"])
    rows = []
    for name in runs:
        row: dict[str, Any] = {"system": name, "seconds": statistics.median(times[name]), "bytes": nbytes}
        for key in ("perf/weight_publish_s", "perf/weight_load_s"):
            if parts[name] and key in parts[name][0]:
                row[key.split("/")[1]] = statistics.median(p[key] for p in parts[name])
        row["vs_peer"] = row["seconds"] / peer_s
        rows.append(row)
    for publisher in publishers.values():
        publisher.close()
    return rows


def start_groups(
    model_dir: str, max_model_len: int, threads: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(rollout groups by row name, vllm groups by transport row name, start-up seconds)."""
    from rollout.config import RolloutConfig
    from rollout.group import RolloutGroup

    def group(backend: str, sync: str, notify: str = "socket") -> tuple[Any, float]:
        cfg = RolloutConfig(
            backend=backend,
            max_model_len=max_model_len,
            kv_cache_gib=0.25,
            weight_sync=sync,
            threads=threads,
            weight_notify=notify,
        )
        start = time.perf_counter()
        g = RolloutGroup(cfg, model_dir, num_workers=1)
        return g, time.perf_counter() - start

    hf, hf_s = group("hf", "shm")
    vllm_shm, vllm_shm_s = group("vllm", "shm")
    vllm_shm_call, _ = group("vllm", "shm", notify="ray")
    vllm_ray, vllm_ray_s = group("vllm", "ray")
    rollout = {"assay hf backend": hf, "assay vllm backend (default)": vllm_shm}
    sync = {
        "update_weights vllm, shm": vllm_shm,
        "update_weights vllm, shm, weight_notify=ray": vllm_shm_call,
        "update_weights vllm, ray": vllm_ray,
    }
    startup = {
        "hf actor (group start, s)": hf_s,
        "vllm actor (group start, s)": min(vllm_shm_s, vllm_ray_s),
        "vllm engine inside actor (s)": vllm_shm.startup_s[0],
    }
    return rollout, sync, startup


def print_tables(result: dict[str, Any]) -> None:
    a = result["args"]
    print(
        f"model: Llama {a['layers']}x{a['hidden']} ({result['n_params'] / 1e6:.2f} M params), fp32; "
        f"{a['prompts']} arithmetic prompts x n={a['n']}, temperature 1, max_tokens {a['max_tokens']}"
    )
    print(
        f"torch threads: peer {result['peer_threads']}, rollout actors (rollout.threads) {a['threads']}; "
        f"median of {a['repeats']} interleaved repeats after one warm-up pass"
    )
    print(
        f"load average before / after: {result['load_before']} / {result['load_after']} on {os.cpu_count()} CPUs"
    )
    print("start-up: " + ", ".join(f"{k} {v:.1f}" for k, v in result["startup"].items()))
    print()
    print("| rollout | generated tokens | seconds | tok/s | vs plain generate |")
    print("|---|---:|---:|---:|---:|")
    for row in result["rollout"]:
        print(
            f"| {row['system']} | {row['tokens']:.0f} | {row['seconds']:.2f} | {row['tokens_per_s']:.0f} "
            f"| {row['vs_peer']:.2f}x |"
        )
    print()
    mib = result["sync"][0]["bytes"] / 2**20
    print(
        f"| weight sync ({mib:.2f} MiB fp32) | seconds | publish s | fetch + verify + RPC s | vLLM load s "
        "| vs load_state_dict |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in result["sync"]:
        if "weight_publish_s" in row:
            rest = row["seconds"] - row["weight_publish_s"] - row["weight_load_s"]
            parts = f"{row['weight_publish_s']:.4f} | {rest:.4f} | {row['weight_load_s']:.4f}"
        else:
            parts = "- | - | -"
        print(f"| {row['system']} | {row['seconds']:.4f} | {parts} | {row['vs_peer']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="serve this checkpoint directory instead of building the tiny Llama")
    parser.add_argument("--hidden", type=int, default=128, help="width of the built model (the demo's)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the built model")
    parser.add_argument(
        "--heads", type=int, default=4, help="attention heads (head size 32: a vLLM CPU size)"
    )
    parser.add_argument("--intermediate", type=int, default=512, help="MLP width of the built model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the peer and of each actor")
    parser.add_argument("--prompts", type=int, default=64, help="arithmetic prompts per rollout call")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=12, help="most generated tokens per sample")
    parser.add_argument("--repeats", type=int, default=3, help="timed, interleaved repeats per system")
    parser.add_argument("--sync-repeats", type=int, default=5, help="timed weight updates per system")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8 prompts x 4, 8 tokens, 2 repeats; GRPO 3 steps")
    parser.add_argument("--out", help="write the results as JSON to this file")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--trl", action="store_true", help="only (c): GRPO training, Assay against TRL")
    which.add_argument("--no-trl", action="store_true", help="only (a) and (b)")
    parser.add_argument("--steps", type=int, default=20, help="(c): RL steps (generation batches) of each system")
    parser.add_argument("--lr", type=float, default=3e-5, help="(c): peak learning rate (the demo's RL stage)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="(c): optimizer steps of linear warmup")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="(c): sequences per optimizer step (prompts x n must be a multiple)")
    parser.add_argument("--pairs", type=int, default=2, help="(c): alternating Assay/TRL pairs (A B A B ...)")
    parser.add_argument("--last", type=int, default=5, help="(c): the reward is the mean over this many last steps")
    parser.add_argument("--assay-override", action="append", default=[], metavar="KEY=VALUE",
                        help="(c): extra Hydra override of Assay's RL stage, mapped to TRL where it has one")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.n, args.max_tokens, args.repeats, args.sync_repeats = 8, 4, 8, 2, 2
        args.steps, args.batch_size, args.warmup_steps, args.last = 3, 32, 1, 2
    trl_wanted = not args.no_trl
    if trl_wanted and importlib.util.find_spec("trl") is None:
        if args.trl:
            parser.error('--trl needs trl: pip install "torch==2.13.0" -e ".[cpu,bench]"')
        print('[bench] trl is not installed: skipping (c), the GRPO comparison (pip install -e ".[cpu,bench]")')
        trl_wanted = False
    result: dict[str, Any] = {"args": vars(args)}
    if not args.trl:
        result.update(bench_serving(args))
        print_tables(result)
    if trl_wanted:
        from bench.trl_compare import GrpoBench, compare, print_comparison

        bench = GrpoBench(steps=args.steps, prompts=args.prompts, n=args.n, max_tokens=args.max_tokens, lr=args.lr,
                          warmup_steps=args.warmup_steps, batch_size=args.batch_size, threads=args.threads,
                          last=args.last, overrides=tuple(args.assay_override))
        with tempfile.TemporaryDirectory() as tmp:
            result.update(compare(bench, args.model, args.quick, Path(tmp), pairs=args.pairs))
        print()
        print_comparison(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def bench_serving(args: argparse.Namespace) -> dict[str, Any]:
    """(a) and (b): rollout throughput and weight sync, with what the tables print."""
    import ray

    from engine.ray_cluster import init_ray
    from engine.tasks.arithmetic import ArithmeticSource

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    prompts = [t.prompt for t in ArithmeticSource(digits=2, operators="+", seed=0).sample(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(
            Path(tmp) / "model", args.hidden, args.layers, args.heads, args.intermediate
        )
        init_ray(num_cpus=4)  # 4 one-CPU actors (hf, vllm+shm, vllm+shm with Ray-call notify, vllm+ray)
        rollout_groups, sync_groups, startup = start_groups(
            model_dir, max_model_len=256, threads=args.threads
        )
        try:
            rollout = bench_rollout(model_dir, rollout_groups, prompts, args.n, args.max_tokens, args.repeats)
            sync = bench_weight_sync(model_dir, sync_groups, args.sync_repeats)
        finally:
            for group in {id(g): g for g in (*rollout_groups.values(), *sync_groups.values())}.values():
                group.shutdown()
        n_params = sum(t.numel() for t in PlainGenerate(model_dir).model.parameters())
    ray.shutdown()  # (c) starts its own Ray instance with the RL stage's resources
    return {
        "n_params": n_params,
        "peer_threads": torch.get_num_threads(),
        "startup": startup,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rollout": rollout,
        "sync": sync,
    }


if __name__ == "__main__":
    main()
