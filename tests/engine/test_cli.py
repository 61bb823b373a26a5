"""`assay` at its boundary: every bad input ends in one line on stderr (no traceback) that names the
key, file, line or path, with the documented exit code, before any actor starts. Run in-process
through `engine.cli.main`, as the console script does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import checkpoint
from engine.cli import main
from tests.engine.plugins import write_doubling_prompts


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Task files good and bad, and a model directory whose config does not describe its weights."""
    from engine.models import ModelConfig, prepare_model_dir

    root = tmp_path_factory.mktemp("cli_inputs")
    good = write_doubling_prompts(root / "tasks.jsonl")
    (root / "latin1.jsonl").write_bytes(good.read_bytes().replace(b"What", b"Qu\xe9", 1).replace(b"\n", b"\n", 1))
    rows = good.read_text().splitlines()
    (root / "missing_field.jsonl").write_text("\n".join([*rows[:2], json.dumps({"prompt": "x"}), *rows[3:]]) + "\n")
    unreadable = [json.loads(r) for r in rows]
    unreadable[4]["answer"] = "\\frac{1}{"  # no closing brace: no verifier can read it
    unreadable[9]["answer"] = "So we get \\boxed{"
    (root / "bad_reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unreadable))
    corpus = [json.loads(r)["prompt"] for r in rows]
    model = prepare_model_dir(ModelConfig(), corpus, root / "model")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    return {"root": root, "good": good, "model": model}


def _rl(inputs: dict[str, Path], *extra: str) -> list[str]:
    return ["train", "stage=rl", "task=file", f"task.file.path={inputs['good']}", f"runs_dir={inputs['root']}/runs",
            "task.eval_size=4", "progress=false", *extra]


CASES = {
    # name: (arguments, exit code, text the one line must contain)
    "negative save_every": (lambda i: ["train", "save_every=-3"], 2, "save_every=-3 is not allowed"),
    "no verifier workers": (lambda i: ["train", "verifier.workers=0"], 2, "verifier.workers=0 is not allowed"),
    "resume and overwrite": (lambda i: ["train", "resume=true", "overwrite=true"], 2, "contradict"),
    "missing task file": (lambda i: _rl(i, f"task.file.path={i['root']}/nope.jsonl"), 1, "nope.jsonl: no such task file"),
    "task file not UTF-8": (lambda i: _rl(i, f"task.file.path={i['root']}/latin1.jsonl"), 1,
                            "latin1.jsonl:1: not UTF-8 text (byte 0xe9"),
    "task row without a field": (lambda i: _rl(i, f"task.file.path={i['root']}/missing_field.jsonl"), 1,
                                 "missing_field.jsonl:3: field"),
    "references no verifier can read": (lambda i: _rl(i, f"task.file.path={i['root']}/bad_reference.jsonl"), 1,
                                        "2 of 40 references cannot be read by their verifier"),
    "no model directory": (lambda i: _rl(i, f"model.path={i['root']}/no-model"), 1, "no such directory"),
    "config that does not fit the weights": (lambda i: _rl(i, f"model.path={i['model']}"), 1,
                                             "down_proj.weight has shape [64, 256] but"),
    "unknown verifier": (lambda i: _rl(i, "task.file.verifier=nope"), 1, "verifier 'nope' cannot be built"),
    "verifier endpoint refusing connections": (lambda i: _rl(i, "verifier.endpoint=127.0.0.1:1"), 1,
                                               "verifier.endpoint=127.0.0.1:1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_it(case: str, inputs: dict[str, Path], capsys) -> None:
    make_args, code, text = CASES[case]
    assert main(make_args(inputs)) == code
    err = capsys.readouterr().err.strip()
    assert text in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (inputs["root"] / "runs" / "default" / "rl").exists()  # nothing was opened


def test_debug_shows_the_traceback(inputs: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        main(_rl(inputs, f"model.path={inputs['root']}/no-model", "--debug"))


def test_resuming_a_finished_stage_says_so_and_keeps_it(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "default" / "pretrain"
    checkpoint.write_atomic(run_dir / "final", lambda tmp: checkpoint.write_state(tmp, {"step": 7}))
    assert main(["train", f"runs_dir={tmp_path}", "resume=true"]) == 0
    assert "finished at step 7 already; nothing to resume" in capsys.readouterr().out
    assert main(["train", f"runs_dir={tmp_path}"]) == 1
    assert "already holds a finished run" in capsys.readouterr().err
    assert checkpoint.read_state(run_dir / "final") == {"step": 7}
