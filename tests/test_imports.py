"""The layering of DESIGN.md §1: `verifiers/` and `learner/algos/` import without the heavy stack."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> list[str]:
    path = ROOT / package.replace(".", "/")
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def _import_blocked(modules: list[str], blocked: list[str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # any import of it now raises ImportError\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "print('ok')\n"
    )
    return subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("package", "blocked"),
    [
        ("verifiers", ["torch", "ray", "deepspeed", "vllm", "transformers"]),
        ("learner.algos", ["ray", "deepspeed", "vllm", "transformers"]),
        ("weights", ["ray", "deepspeed", "vllm", "transformers"]),  # learner/ and rollout/ both import it
    ],
)
def test_package_imports_without_heavy_stack(package: str, blocked: list[str]) -> None:
    modules = _modules(package)
    assert len(modules) > 1, f"{package} has no modules to check"
    result = _import_blocked(modules, blocked)
    assert result.returncode == 0, result.stderr[-3000:]


def test_blocking_really_blocks() -> None:
    # The check above must be able to fail: a module that needs torch fails with torch blocked.
    result = _import_blocked(["learner.algos.sft"], ["torch"])
    assert result.returncode != 0 and "import of torch halted" in result.stderr


# DESIGN.md §1: engine -> {learner, rollout, verifiers}, learner -> learner.algos, never the reverse.
FORBIDDEN = {
    "verifiers": ("engine", "learner", "rollout"),
    "learner": ("engine", "rollout"),
    "rollout": ("engine", "learner"),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package: str) -> None:
    import ast

    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN[package]]
    assert not offenders, offenders
