"""GPU smoke: the learner, the `hf` rollout backend and the `nccl` weight broadcast on one bare GPU box.

The GPU boxes we can test on have one H100 or H200, Python 3.12, torch and transformers, but no
vllm, ray or deepspeed and no network; DeepSpeed and its few dependencies travel as wheels
(docs/benchmarks.md, "GPU smoke"). This script exercises what can run there, each section timed and
guarded (a failure is recorded as `{"section": ..., "ok": false, "error": ...}` and the rest still
run), and writes one JSON, rewritten after every section so a killed run keeps what it measured:

1. `model`: a random-init Qwen2 of Qwen2-0.5B's shape (`--params 0.5b`: hidden 896, 24 layers, 14
   heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings) or a tiny one for CPUs, saved
   with a byte-level tokenizer whose vocabulary is exactly the model's (`save_tokenizer`).
2. `learner`: `learner.worker.LearnerWorker` in-process (world size 1), ZeRO-2, bf16 on CUDA (fp32
   on CPU): supervised steps on random tokens (tokens/s, MFU) and one RL step (`train_rl_step`).
3. `rollout`: `rollout.worker.RolloutWorker` with the `hf` backend (which picks CUDA when present)
   serving the learner's weights: n samples for a few prompts, tokens/s.
4. `broadcast`: two spawned processes, rank 0 publishing the learner's weights with
   `weights.nccl.NcclWeightSync` (as learner rank 0 does), rank 1 an `hf` rollout worker receiving them
   (`join_broadcast` / `receive_broadcast`): seconds per sync and GB/s. NCCL on CUDA, gloo on CPU.
   Two NCCL ranks on ONE GPU are refused by NCCL before 2.30 ("Duplicate GPU detected"; 2.30 has it
   behind `NCCL_MULTI_RANK_GPU_ENABLE=1`, which the ranks set): when the NCCL run fails on CUDA, the
   section `broadcast_gloo` repeats it over gloo (CPU tensors, loaded into the CUDA model) so the box
   still gives a sync number.

The transport's process group normally comes from vLLM (`stateless_init_torch_distributed_process_group`),
which the box lacks; without vLLM (`--group auto`) each broadcast rank, a fresh process with no other
group, joins torch's default group instead and hands it to the same publisher/receiver code.

MFU = 6 * N * tokens/s / peak, N = the parameters in matmuls (all of them here: the embedding is tied
to the LM head), peak = dense bf16 of the detected GPU (`PEAK_BF16`, or `--peak-tflops`); attention's
T^2 FLOPs are not counted. On CPU it is null.

    python bench/gpu_smoke.py --out FILE.json [--params 0.5b|tiny] [--device cuda|cpu] [--time-budget-s 420]

`ASSAY_SMOKE_BARE=1` blocks `import ray` and `import vllm` in every process of the run, as on the box.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import queue as queue_module
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if os.environ.get("ASSAY_SMOKE_BARE") == "1":
    sys.modules["ray"] = None  # type: ignore[assignment]
    sys.modules["vllm"] = None  # type: ignore[assignment]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

EOS = "<|endoftext|>"
# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(), first match wins.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


@dataclass(frozen=True)
class Shape:
    """Model shape and workload of one `--params` choice."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int  # learner sequence length
    micro: int  # learner micro-batch
    batch: int  # learner batch (sequences per optimizer step)
    steps: int  # supervised steps; the first is a warm-up, not timed
    prompts: int
    n: int  # rollout samples per prompt
    prompt_len: int
    max_tokens: int
    syncs: int  # timed broadcasts, after one warm-up


SHAPES = {
    "0.5b": Shape(896, 24, 14, 2, 4864, 151936, seq=1024, micro=8, batch=16, steps=8,
                  prompts=8, n=8, prompt_len=32, max_tokens=128, syncs=3),
    "tiny": Shape(64, 2, 2, 1, 128, 512, seq=64, micro=2, batch=4, steps=3,
                  prompts=2, n=4, prompt_len=8, max_tokens=16, syncs=2),
}  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: str, override_tflops: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, where it came from); (None, why) on CPU or an unknown GPU."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if device != "cuda":
        return None, "cpu: no peak"
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"PEAK_BF16[{key!r}]"
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


# ---- 1. model --------------------------------------------------------------------------------------


def save_tokenizer(vocab_size: int, out_dir: Path) -> None:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids and no merges: id 0 is eos (and pad),
    ids 1..256 the 256 bytes (so any text encodes, one token per byte), the rest the words `t{i}`
    (decodable, never produced by encoding). Byte-level BPE because transformers 5 loads the tokenizer
    of a `qwen2` checkpoint as `Qwen2Tokenizer`, which rebuilds a byte-level BPE from tokenizer.json's
    vocabulary and merges whatever model the file names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = [EOS, *alphabet] + [f"t{i}" for i in range(vocab_size - 1 - len(alphabet))]
    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(str(out_dir))


def build_model_dir(shape: Shape, device: str, out_dir: Path) -> dict[str, Any]:
    """A random-init Qwen2 of `shape`, built on `device`, saved (bf16 on CUDA) with its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(4096, shape.seq),
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())  # tied: the embedding is counted once
    model = model.to(torch.bfloat16 if device == "cuda" else torch.float32)  # type: ignore[arg-type]
    model.save_pretrained(str(out_dir))
    save_tokenizer(shape.vocab, out_dir)
    del model
    checkpoint_mb = sum(f.stat().st_size for f in out_dir.glob("*.safetensors")) / 2**20
    return {"params": params, "checkpoint_mb": round(checkpoint_mb, 1), "model_dir": str(out_dir)}


# ---- 2. learner ------------------------------------------------------------------------------------


def random_batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (rows, seq), generator=gen)  # (B, T)
    attention_mask = torch.ones(rows, seq, dtype=torch.long)  # (B, T)
    loss_mask = attention_mask.clone()
    loss_mask[:, 0] = 0  # token 0 has no prefix to predict it from
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def learner_section(shape: Shape, device: str, model_dir: Path, params: int, peak: float | None,
                    deadline: float) -> dict[str, Any]:  # fmt: skip
    """Supervised steps, then one RL step; saves the trained weights for the rollout and broadcast."""
    from safetensors.torch import save_file

    from learner.config import LearnerConfig
    from learner.worker import LearnerWorker
    from weights.nccl import free_port

    cfg = LearnerConfig(
        zero_stage=2,
        precision="bf16" if device == "cuda" else "fp32",
        batch_size=shape.batch,
        micro_batch_size=shape.micro,
        lr=1e-5,
        lr_schedule="constant",
    )
    start = time.perf_counter()
    worker = LearnerWorker(cfg, str(model_dir), 0, 1, total_steps=shape.steps + 1, master_port=free_port())
    init_s = time.perf_counter() - start
    batch = random_batch(shape.batch, shape.seq, shape.vocab, seed=0)
    step_s: list[float] = []
    losses: list[float] = []
    for _ in range(shape.steps):
        sync(device)
        start = time.perf_counter()
        metrics = worker.train_step(batch)
        sync(device)
        step_s.append(time.perf_counter() - start)
        losses.append(metrics["learner/loss"])
        if time.monotonic() > deadline:
            break
    timed = step_s[1:] or step_s  # the first step pays for allocations and kernel selection
    tokens_per_s = shape.batch * shape.seq / statistics.median(timed)
    rl_batch = random_batch(shape.batch, shape.seq, shape.vocab, seed=1)
    rl_batch["advantages"] = (
        torch.randn(shape.batch, 1).expand(-1, shape.seq).contiguous() * rl_batch["loss_mask"]
    )
    # One minibatch of all rows. Built here, not by learner.group.plan_rl_step (what train_rl_step
    # calls without a plan): learner.group imports ray at module level, and the box has no ray.
    loss_tokens = float(rl_batch["loss_mask"].sum())
    plan = SimpleNamespace(rows=[shape.batch], num_tokens=[loss_tokens], num_seqs=[float(shape.batch)],
                           trained_tokens=[loss_tokens], skipped_rows_frac=0.0)  # fmt: skip
    sync(device)
    start = time.perf_counter()
    rl = worker.train_rl_step(rl_batch, plan)  # type: ignore[arg-type]
    sync(device)
    rl_step_s = time.perf_counter() - start
    state = worker.state_dict_for_rollout()
    save_file({k: v.contiguous() for k, v in state.items()}, str(model_dir / "learner_state.safetensors"))
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    n_tensors = len(state)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    worker.close()
    del worker, state
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "zero_stage": cfg.zero_stage,
        "precision": cfg.precision,
        "seq": shape.seq,
        "batch": shape.batch,
        "micro_batch": shape.micro,
        "init_s": round(init_s, 3),
        "step_s": [round(s, 4) for s in step_s],
        "losses": [round(x, 4) for x in losses],
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(6 * params * tokens_per_s / peak, 4) if peak else None,
        "rl_step_s": round(rl_step_s, 4),
        "rl_loss": rl["learner/loss"],
        "rl_tokens_per_s": round(rl["perf/learner_tokens_per_s"], 1),
        "state_tensors": n_tensors,
        "state_mb": round(nbytes / 2**20, 1),
        "peak_memory_gib": round(peak_mem, 2) if peak_mem is not None else None,
    }


# ---- 3. rollout ------------------------------------------------------------------------------------


def weights_file(model_dir: Path) -> Path:
    """The learner's trained weights, or the checkpoint's when the learner section failed."""
    trained = model_dir / "learner_state.safetensors"
    return trained if trained.exists() else model_dir / "model.safetensors"


def prompts(shape: Shape) -> list[Any]:
    from verifiers.base import Task

    gen = torch.Generator().manual_seed(2)
    letters = torch.randint(ord("a"), ord("z") + 1, (shape.prompts, shape.prompt_len), generator=gen).tolist()
    return [
        Task(f"p{i}", "".join(map(chr, row)), "", "math") for i, row in enumerate(letters)
    ]  # 1 token/letter


def rollout_worker(shape: Shape, device: str, model_dir: Path) -> Any:
    from rollout.config import RolloutConfig
    from rollout.worker import RolloutWorker

    cfg = RolloutConfig(
        backend="hf",
        dtype="bfloat16" if device == "cuda" else "float32",
        n=shape.n,
        max_tokens=shape.max_tokens,
        max_model_len=shape.prompt_len + shape.max_tokens + 8,
    )
    return RolloutWorker(cfg, str(model_dir))


def rollout_section(shape: Shape, device: str, model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from rollout.types import Sampling

    worker = rollout_worker(shape, device, model_dir)
    weights = weights_file(model_dir)
    load_s = worker.load_weights(load_file(str(weights)), version=1)
    tasks = prompts(shape)
    worker.generate(tasks[:1], 1, Sampling(max_tokens=2, seed=0))  # warm-up
    sync(device)
    start = time.perf_counter()
    responses = worker.generate(
        tasks, shape.n, Sampling(temperature=1.0, max_tokens=shape.max_tokens, seed=1)
    )
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.response_ids) for r in responses)
    if any(len(r.response_ids) != len(r.rollout_logprobs) for r in responses):
        raise RuntimeError("a response's token ids and logprobs differ in length")
    out = {
        "backend_device": str(worker.backend.device),  # type: ignore[attr-defined]
        "weights": weights.name,
        "startup_s": round(worker.startup_s, 3),
        "load_weights_s": round(load_s, 4),
        "rows": len(responses),
        "tokens": tokens,
        "generate_s": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "weight_version": responses[0].weight_version,
    }
    del worker
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- 4. broadcast ----------------------------------------------------------------------------------


def _torch_group(host: str, port: int, rank: int, world_size: int, backend: str) -> Any:
    """torch's default group as the transport's group: each broadcast rank is a fresh process."""
    torch.distributed.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank,
                                         world_size=world_size)  # fmt: skip
    return torch.distributed.group.WORLD


def _use_group(kind: str, device: str) -> None:
    os.environ.setdefault("NCCL_MULTI_RANK_GPU_ENABLE", "1")  # NCCL >= 2.30: two ranks on one GPU
    if device == "cuda":
        torch.cuda.set_device(0)
    if kind == "torch":
        import weights.nccl

        weights.nccl._join = _torch_group


def _publisher_rank(port: int, group_device: str, model_dir: str, syncs: int, kind: str, barrier: Any,
                    queue: Any) -> None:  # fmt: skip
    try:
        from safetensors.torch import load_file

        from weights.nccl import NcclWeightSync

        _use_group(kind, group_device)
        state = load_file(str(weights_file(Path(model_dir))))  # on CPU, as the driver holds it
        publisher = NcclWeightSync()
        publisher.join("127.0.0.1", port, 0, 2, group_device)
        times = []
        for version in range(1, syncs + 2):
            barrier.wait()
            start = time.perf_counter()
            handle = publisher.publish(state, version)
            sync(group_device)
            times.append(time.perf_counter() - start)
        queue.put(
            ("publisher", {"publish_s": times, "nbytes": handle.num_bytes, "tensors": handle.num_tensors})
        )
    except Exception:  # noqa: BLE001 -- a rank's failure is the section's record, not a crash
        queue.put(("publisher", {"error": traceback.format_exc(limit=6)}))


def _receiver_rank(port: int, group_device: str, model_device: str, shape: Shape, model_dir: str, kind: str,
                   barrier: Any, queue: Any) -> None:  # fmt: skip
    try:
        from weights import WeightHandle
        from weights.nccl import NcclWeightSync

        _use_group(kind, group_device)
        worker = rollout_worker(shape, model_device, Path(model_dir))
        direct = group_device == model_device  # the rollout's own path: join_broadcast / receive_broadcast
        receiver = None
        if direct:
            worker.join_broadcast("127.0.0.1", port, 1, 2)
        else:
            receiver = NcclWeightSync()
            receiver.join("127.0.0.1", port, 1, 2, group_device)
        times = []
        for version in range(1, shape.syncs + 2):
            barrier.wait()
            start = time.perf_counter()
            if receiver is None:
                worker.receive_broadcast(version)
            else:
                worker.load_weights(receiver.load(WeightHandle.expected("nccl", version)), version)
            sync(model_device)
            times.append(time.perf_counter() - start)
        queue.put(("receiver", {"receive_s": times, "version": worker.version,
                                "backend_device": str(worker.backend.device)}))  # fmt: skip
    except Exception:  # noqa: BLE001 -- a rank's failure is the section's record, not a crash
        queue.put(("receiver", {"error": traceback.format_exc(limit=6)}))


def broadcast_section(shape: Shape, device: str, group_device: str, model_dir: Path, kind: str,
                      timeout_s: float) -> dict[str, Any]:  # fmt: skip
    """Publisher and receiver in two spawned processes; raises with the ranks' errors on failure."""
    import torch.multiprocessing as mp

    from weights.nccl import free_port

    ctx = mp.get_context("spawn")
    queue, barrier, port = ctx.Queue(), ctx.Barrier(2), free_port()
    ranks = [
        ctx.Process(target=_publisher_rank, args=(port, group_device, str(model_dir), shape.syncs, kind, barrier,
                                                  queue)),
        ctx.Process(target=_receiver_rank, args=(port, group_device, device, shape, str(model_dir), kind, barrier,
                                                 queue)),
    ]  # fmt: skip
    for proc in ranks:
        proc.start()
    results: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + timeout_s
    try:
        while len(results) < 2 and time.monotonic() < end:
            try:
                who, result = queue.get(timeout=1.0)
                results[who] = result
                if "error" in result:  # the other rank may hang in a collective: give it 10 s to fail too
                    end = min(end, time.monotonic() + 10.0)
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in ranks) and queue.empty():
                    break  # a rank died without reporting (killed, or a crash in native code)
    finally:
        for proc in ranks:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = {who: r["error"] for who, r in results.items() if "error" in r}
    missing = [who for who in ("publisher", "receiver") if who not in results]
    if errors or missing:
        exits = [p.exitcode for p in ranks]
        raise RuntimeError(f"broadcast over {group_device} ({kind} group) failed: errors {errors}, "
                           f"no result from {missing} (exit codes {exits}, timeout {timeout_s:.0f} s)")  # fmt: skip
    pub, rec = results["publisher"], results["receiver"]
    sync_s = statistics.median(rec["receive_s"][1:])  # version 1 is the warm-up (and the group's set-up)
    return {
        "backend": "nccl" if group_device == "cuda" else "gloo",
        "group": kind,
        "receiver_device": rec["backend_device"],
        "tensors": pub["tensors"],
        "mb": round(pub["nbytes"] / 2**20, 1),
        "syncs": shape.syncs,
        "first_sync_s": round(rec["receive_s"][0], 4),
        "publish_s": round(statistics.median(pub["publish_s"][1:]), 4),
        "sync_s": round(sync_s, 4),
        "gb_per_s": round(pub["nbytes"] / sync_s / 1e9, 3),
        "version": rec["version"],
    }


# ---- driver ----------------------------------------------------------------------------------------


def versions(device: str) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    nccl = torch.cuda.nccl.version() if device == "cuda" else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "transformers": version("transformers"),
        "deepspeed": version("deepspeed"),
        "vllm": version("vllm"),
    }


def group_kind(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import vllm.distributed.utils  # noqa: F401

        return "vllm"
    except ImportError:
        return "torch"


class Report:
    """The JSON being built, rewritten to `path` after every section."""

    def __init__(self, path: Path, header: dict[str, Any], deadline: float) -> None:
        self.path, self.data, self.deadline, self.start = (
            path,
            header | {"sections": []},
            deadline,
            time.monotonic(),
        )

    def run(self, name: str, min_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """`fn()`'s numbers as section `name`, or its error; skipped when under `min_s` seconds of
        budget remain."""
        left = self.deadline - time.monotonic()
        record: dict[str, Any] = {"section": name}
        start = time.perf_counter()
        out = None
        if left < min_s:
            record |= {
                "ok": False,
                "error": f"skipped: {left:.0f} s of the time budget left, needs ~{min_s:.0f} s",
            }
        else:
            try:
                out = fn()
                record |= {"ok": True} | out
            except Exception as exc:  # noqa: BLE001 -- recorded; the other sections still run
                record |= {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc(limit=8)}  # fmt: skip
        record["seconds"] = round(time.perf_counter() - start, 3)
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
        self.data["sections"].append(record)
        self.write()
        return out

    def write(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.start, 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def summary(sections: list[dict[str, Any]]) -> dict[str, Any]:
    by = {s["section"]: s for s in sections if s.get("ok")}
    sync = by.get("broadcast") or by.get("broadcast_gloo") or {}
    return {
        "learner_tokens_per_s": by.get("learner", {}).get("tokens_per_s"),
        "mfu": by.get("learner", {}).get("mfu"),
        "rollout_tokens_per_s": by.get("rollout", {}).get("tokens_per_s"),
        "sync_backend": sync.get("backend"),
        "sync_s": sync.get("sync_s"),
        "sync_gb_per_s": sync.get("gb_per_s"),
        "all_ok": all(s.get("ok") for s in sections),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--params", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    parser.add_argument("--time-budget-s", type=float, default=420.0, help="sections stop starting past it")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak, for an unlisted GPU"
    )
    parser.add_argument("--group", choices=("auto", "vllm", "torch"), default="auto",
                        help="the broadcast's process group: vLLM's stateless one, or torch's default (auto: "
                             "vLLM when importable)")  # fmt: skip
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.time_budget_s
    if args.device == "cpu":  # before anything touches CUDA (DeepSpeed picks its accelerator at import)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    shape = SHAPES[args.params]
    peak, peak_source = peak_flops(device, args.peak_tflops)
    kind = group_kind(args.group)
    header = {
        "bench": "gpu_smoke",
        "params_choice": args.params,
        "shape": asdict(shape),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "peak_flops": peak,
        "peak_source": peak_source,
        "time_budget_s": args.time_budget_s,
        "versions": versions(device),
    }
    report = Report(args.out, header, deadline)
    with tempfile.TemporaryDirectory(prefix="assay-gpu-smoke-") as tmp:
        model_dir = Path(tmp) / "model"
        model = report.run("model", 5, lambda: build_model_dir(shape, device, model_dir))
        params = model["params"] if model else 0
        report.run("learner", 20, lambda: learner_section(shape, device, model_dir, params, peak, deadline))
        report.run("rollout", 10, lambda: rollout_section(shape, device, model_dir))
        # NCCL on one GPU may hang rather than fail: its try gets less, so the gloo fallback has time
        limits = {"cuda": 150.0, "cpu": 240.0 if args.params == "0.5b" else 120.0}

        def broadcast(group_device: str) -> dict[str, Any]:
            timeout_s = max(0.0, min(limits[group_device], deadline - time.monotonic()))
            return broadcast_section(shape, device, group_device, model_dir, kind, timeout_s)

        if report.run("broadcast", 20, lambda: broadcast(device)) is None and device == "cuda":
            report.run("broadcast_gloo", 20, lambda: broadcast("cpu"))  # the NCCL fallback
    report.data["summary"] = summary(report.data["sections"])
    report.write()
    print(json.dumps(report.data["summary"]), flush=True)
    return 0 if report.data["summary"]["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
