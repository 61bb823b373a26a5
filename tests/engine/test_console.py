"""The console keeps to the progress bar, Assay's lines and real warnings; third-party output goes to
`third_party.log` in the run directory (`--verbose` prints everything)."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from engine import console

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # as Python prints a warning
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")

    monkeypatch.setattr(warnings, "showwarning", show)  # not pytest's recorder: quiet() keeps what it finds
    console.quiet()
    console.expect_log(tmp_path / "run" / console.LOG_NAME)
    yield tmp_path / "run" / console.LOG_NAME
    console.restore()


@pytest.mark.parametrize(("line", "shown"), [
    ("[assay] placement colocated: learners on node 127.0.0.1/ab", True),
    ("/work/main/learner/actor.py:40: UserWarning: LearnerConfig: precision=bf16 with zero_stage=0", True),
    ("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_1/rollout/worker.py:9: UserWarning: x", True),
    ("(MainProcess pid=7) WARNING 12-07 21:28:34 [arg_utils.py:1945] The global random seed is set to 0.", False),
    ("/venv/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py:138: FutureWarning: `reduce_op`", False),
    ("/venv/lib/python3.11/site-packages/foo/engine/x.py:1: UserWarning: a package with our folder names", False),
    ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", False),
])
def test_a_worker_line_is_for_people_when_it_is_ours(line: str, shown: bool) -> None:
    assert console.for_people(line) is shown


def test_quiet_routes_third_party_output_to_the_file_and_keeps_ours(quiet: Path, capsys) -> None:
    library = logging.getLogger("somelib")
    library.addHandler(logging.StreamHandler(sys.stderr))  # as Ray, vLLM and DeepSpeed do
    library.propagate = False
    library.setLevel(logging.INFO)
    try:
        console.route_loggers()
        library.info("chatter before the run directory exists")
        assert not quiet.exists()  # held: the run directory is opened only once every input is checked
        assert console.open_log() == quiet
        library.warning("a library warning")
        library.error("a library error")
        warnings.showwarning("torch deprecation", FutureWarning, "/venv/site-packages/torch/x.py", 3)
        warnings.showwarning("ours", UserWarning, str(ROOT / "engine" / "runs.py"), 5)
        console._worker_lines({"pid": 42, "actor_name": "RolloutActor", "is_err": True, "ip": "127.0.0.1",
                               "localhost": "127.0.0.1",
                               "lines": ["(MainProcess pid=42) INFO vLLM is starting", "[assay] rollout ready"]})
        out, err = capsys.readouterr()
        log = quiet.read_text()
        for text in ("chatter before", "a library warning", "a library error", "torch deprecation",
                     "(RolloutActor pid=42) (MainProcess pid=42) INFO vLLM is starting"):
            assert text in log
        for text in ("chatter before", "a library warning", "torch deprecation", "vLLM is starting"):
            assert text not in out + err
        assert "a library error" in err  # errors reach the console as well
        assert "UserWarning: ours" in err and "(RolloutActor pid=42) [assay] rollout ready" in err
    finally:
        console.restore()
        handlers, library.handlers = library.handlers, []
    assert len(handlers) == 1 and not library.propagate  # restore() gave the library its handler back


def _train(runs_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "train", "experiment=arith_tiny", "stage=pretrain", "steps=2",
         "progress=false", "task.eval_size=8", "learner.batch_size=4", "learner.micro_batch_size=4",
         f"runs_dir={runs_dir}", *extra],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_prints_its_own_lines_and_logs_the_rest(tmp_path: Path) -> None:
    # precision=bf16 at zero_stage=0 makes the learner actor warn (learner.worker.BF16_STAGE0_WARNING)
    proc = _train(tmp_path / "quiet", "learner.precision=bf16", "learner.zero_stage=0")
    printed = (proc.stdout + proc.stderr).splitlines()
    log = (tmp_path / "quiet" / "arith_tiny" / "pretrain" / console.LOG_NAME).read_text()
    assert "Started a local Ray instance" in log and "(LearnerActor pid=" in log and "comm_op built" in log
    assert not any("Started a local Ray instance" in line or "comm_op built" in line for line in printed)
    from_actors = [line for line in printed if line.startswith("(LearnerActor pid=")]
    assert len(from_actors) == 1 and "UserWarning: LearnerConfig: precision=bf16 with zero_stage=0" in from_actors[0]
    assert all(line.startswith(("[assay]", "(LearnerActor")) for line in printed), printed

    verbose = _train(tmp_path / "verbose", "--verbose")
    assert "Started a local Ray instance" in verbose.stderr
    assert "(LearnerActor pid=" in verbose.stdout + verbose.stderr
    assert not (tmp_path / "verbose" / "arith_tiny" / "pretrain" / console.LOG_NAME).exists()
