"""`assay`: the command line.

    assay train [OVERRIDES...]          one stage (stage=pretrain|sft|dpo|rm|rl) of an experiment
    assay demo  [OVERRIDES...]          the embedded default: pretrain -> SFT -> GRPO on the local CPU, with a report
    assay config [OVERRIDES...]         print the resolved configuration
    assay verify --verifier ... --input FILE.jsonl      score responses offline
    assay serve-verifiers --host 127.0.0.1 --port N     serve a verifier pool over gRPC
    assay contamination --train TASKS.jsonl --eval EVAL.jsonl [--n 13]   n-gram overlap check

OVERRIDES are Hydra overrides: `experiment=arith_tiny learner.lr=1e-3 cluster.learners=2`.
`--debug` (anywhere) shows the traceback of an error instead of its one-line message.
`--verbose` (anywhere, or ASSAY_VERBOSE=1) prints everything vLLM, DeepSpeed, Ray and the other
libraries print; by default `train` and `demo` keep the console to the progress bar, Assay's own lines
and real warnings, and write the rest to `third_party.log` in the stage's run directory.

Exit codes: 0 done; 1 an error (one line on stderr); 2 a usage or configuration error; 130 / 143
stopped by SIGINT / SIGTERM after a checkpoint (the line printed says how to continue); `assay verify`
documents its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine import checkpoint, console, errors, stopping
from engine.config import AssayConfig, ConfigError, compose_config, to_yaml
from engine.ray_cluster import set_process_env
from engine.runs import StageResult, finished, move_aside, stage_dir
from weights import remove_orphans

# The demo's stages: (stage, overrides that make it a good default on a 2-core CPU) on top of
# `experiment=demo`. A short pretraining on worked sums; SFT on clean demonstrations until the model is
# right on 90% of the held-out sums; SFT on a flawed teacher's demonstrations (right 40% of the time,
# otherwise every carry dropped), the checkpoint RL starts from; GRPO learns past the teacher from
# the verifier's rewards.
DEMO_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pretrain", ("steps=200", "eval_every=100", "learner.lr=2e-3", "learner.warmup_steps=20",
                  "learner.batch_size=32", "learner.micro_batch_size=16")),
    ("sft", ("stage_dir=sft_clean", "steps=3000", "stop_at_accuracy=0.9", "eval_every=25", "learner.lr=2e-3",
             "learner.warmup_steps=10")),
    ("sft", ("init_from=sft_clean", "steps=150", "eval_every=50", "learner.lr=1e-3", "learner.warmup_steps=10",
             "task.arithmetic.teacher_accuracy=0.4")),
    ("rl", ("steps=50", "eval_every=10", "learner.lr=3e-5", "learner.warmup_steps=10")),
)
# `experiment=code_demo` (the policy writes Python, the sandboxed unit_tests verifier scores it): the same
# four stages; SFT evaluates every 50 steps and RL runs 20 steps at a higher rate, because each sampled
# program costs a sandbox run and verification is most of an RL step.
CODE_DEMO_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pretrain", ("steps=200", "learner.lr=2e-3", "learner.warmup_steps=20", "learner.batch_size=32",
                  "learner.micro_batch_size=16")),
    ("sft", ("stage_dir=sft_clean", "steps=3000", "stop_at_accuracy=0.9", "eval_every=50", "learner.lr=2e-3",
             "learner.warmup_steps=10")),
    ("sft", ("init_from=sft_clean", "steps=150", "eval_every=50", "learner.lr=1e-3", "learner.warmup_steps=10",
             "task.linear_code.teacher_accuracy=0.4")),
    ("rl", ("steps=20", "eval_every=10", "learner.lr=1e-4", "learner.warmup_steps=5")),
)
# `experiment=preference` (configs/experiment/preference.yaml): the demo's first three stages, then a reward
# model and DPO on generated pairs from the flawed teacher's SFT export, and GRPO from that same export
# against the reward model alone, the math verifier logged beside it at weight 0 (the gold judge).
PREFERENCE_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    *DEMO_STAGES[:3],
    ("rm", ("task=arithmetic_pairs", "init_from=sft", "steps=100", "eval_every=25", "learner.lr=3e-4",
            "learner.warmup_steps=10")),
    ("dpo", ("task=arithmetic_pairs", "init_from=sft", "steps=100", "eval_every=25", "learner.lr=1e-4",
             "learner.warmup_steps=10")),
    ("rl", ("stage_dir=rl_rm", "init_from=sft", "steps=30", "eval_every=10", "learner.lr=3e-5",
            "learner.warmup_steps=10", "+verifier.options.reward_model.path=${runs_dir}/${name}/rm/final/hf",
            "verifier.rewards=[{verifier:reward_model,weight:1.0},{verifier:task,weight:0.0}]")),
)
# experiment -> its demo stages; any other experiment runs DEMO_STAGES.
STAGES_BY_EXPERIMENT = {"code_demo": CODE_DEMO_STAGES, "preference": PREFERENCE_STAGES}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    verbose = "--verbose" in argv or os.environ.get("ASSAY_VERBOSE", "") not in ("", "0")
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    set_process_env()
    parser = argparse.ArgumentParser(prog="assay", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train one stage"), ("demo", "pretrain -> SFT on the embedded default"),
                            ("config", "print the resolved config")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. learner.lr=1e-3")
    from verifiers import cli as verifiers_cli

    verifiers_cli.add_verify_args(sub.add_parser("verify", help="score a jsonl file of responses"))
    verifiers_cli.add_serve_args(sub.add_parser("serve-verifiers", help="serve a verifier pool over gRPC"))
    from engine import contamination

    contamination.add_args(sub.add_parser("contamination", help="n-gram overlap of eval items with training tasks"))
    args = parser.parse_args(argv)
    remove_orphans()  # shared-memory weights and sockets of Assay processes that were SIGKILLed
    if args.command in ("train", "demo"):
        stopping.install()
        if not verbose:
            console.quiet()
    try:
        return COMMANDS[args.command](args)
    except stopping.Stopped as stop:
        print(f"[assay] {_stopped_line(stop, argv)}", file=sys.stderr)
        _stop_ray()
        return stop.exit_code
    except ConfigError as err:
        if debug:
            raise
        print(f"assay: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            raise
        print(f"assay: error: {errors.one_line(err)}", file=sys.stderr)
        if (log := console.log_path()) is not None:
            print(f"[assay] what vLLM, DeepSpeed and Ray printed: {log}", file=sys.stderr)
        return 1
    finally:
        stopping.uninstall()
        console.restore()


def _stopped_line(stop: stopping.Stopped, argv: list[str]) -> str:
    """"stopped at step N; continue with: assay <the same command> resume=true"."""
    kept = [a for a in argv if not a.startswith(("resume=", "overwrite="))]
    where = f" (checkpoint {stop.saved})" if stop.saved else ""
    command = " ".join(["assay", *kept, "resume=true"])
    return f"stopped at step {stop.step}{where}; continue with: {command}"


def _stop_ray() -> None:
    """Shut down the Ray instance this process started (a stop leaves no actor or raylet behind)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def run_stage(cfg: AssayConfig) -> StageResult:
    """Run the stage `cfg.stage` names (a table, not a branch)."""
    from engine.rl import run_rl
    from engine.supervised import run_stage as run_supervised

    run_dir = stage_dir(cfg)
    if cfg.resume and finished(run_dir):  # nothing to resume: say so and hand on the export
        step = int(checkpoint.read_state(run_dir / "final")["step"])
        print(f"[assay] {run_dir} finished at step {step} already; nothing to resume")
        return StageResult(run_dir, run_dir / "final" / "hf", step, {})
    console.expect_log(run_dir / console.LOG_NAME)
    logs = f" (third-party output: {console.LOG_NAME} there; --verbose prints it)" if console.is_quiet() else ""
    print(f"[assay] {cfg.stage}: run directory {run_dir.absolute()}{logs}")
    runners = {"pretrain": run_supervised, "sft": run_supervised, "dpo": run_supervised, "rm": run_supervised, "rl": run_rl}
    result = runners[cfg.stage](cfg)
    if (signum := stopping.pending()) is not None:  # a signal during the last step: the stage is done
        raise stopping.Stopped(result.steps, signum, result.export_dir.parent)
    return result


def _train(args: argparse.Namespace) -> int:
    cfg = compose_config(list(args.overrides))
    result = run_stage(cfg)
    print(f"[assay] {cfg.stage} done: {result.steps} steps; export {result.export_dir}")
    if result.metrics:
        print("[assay] " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from engine.report import write_report

    user = list(args.overrides)
    if not any(o.startswith("experiment=") for o in user):
        user.insert(0, "experiment=demo")
    experiment = [o.partition("=")[2] for o in user if o.startswith("experiment=")][-1]
    first = compose_config([f"stage={DEMO_STAGES[0][0]}", *user])
    earlier = Path(first.runs_dir) / first.name
    if not (first.resume or first.overwrite) and earlier.is_dir() and any(earlier.iterdir()):
        print(f"[assay] demo: moved the earlier demo run aside to {move_aside(earlier)} "
              "(pass resume=true to continue it instead)")
    results = []
    for stage, defaults in STAGES_BY_EXPERIMENT.get(experiment, DEMO_STAGES):
        cfg = compose_config([*defaults, f"stage={stage}", *user])
        print(f"[assay] demo stage {stage}: {cfg.steps} steps, {cfg.cluster.learners} learner(s)")
        start = time.perf_counter()
        results.append((run_stage(cfg), time.perf_counter() - start))
    report = write_report(results[0][0].run_dir.parent, [(r.run_dir, seconds) for r, seconds in results])
    print(f"[assay] demo done; report: {report}")
    return 0


def _config(args: argparse.Namespace) -> int:
    print(to_yaml(compose_config(list(args.overrides))), end="")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from verifiers import cli as verifiers_cli

    return verifiers_cli.run_verify(args)


def _serve(args: argparse.Namespace) -> int:
    from verifiers import cli as verifiers_cli

    return verifiers_cli.run_serve(args)


def _contamination(args: argparse.Namespace) -> int:
    from engine.contamination import run_cli

    return run_cli(args)


COMMANDS = {"train": _train, "demo": _demo, "config": _config, "verify": _verify, "serve-verifiers": _serve,
            "contamination": _contamination}

if __name__ == "__main__":
    sys.exit(main())
