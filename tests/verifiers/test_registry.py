"""verifiers.registry: entry points and `module:Class` paths resolve to verifiers; bad names explain."""

from __future__ import annotations

import subprocess
import sys

import pytest

import verifiers
from tests.verifiers.plugins import PATH, EchoVerifier
from verifiers.base import Task, Verdict, Verifier
from verifiers.registry import UnknownVerifierError, available, display_name, load, resolve


def test_load_module_class_path_passes_options() -> None:
    v = verifiers.load(f"{PATH}:EchoVerifier", tag="-x")
    assert isinstance(v, EchoVerifier) and isinstance(v, Verifier)
    assert v.verify("7", Task("t", "", "7", "echo")) == Verdict(1.0, "echo-x", {"length": 1.0})


def test_builtins_are_entry_points() -> None:
    # pyproject.toml registers both under `assay.verifiers`; the editable install exposes them.
    assert {"math", "unit_tests"} <= set(available())


def test_builtin_math_loads_by_name() -> None:
    v = load("math")
    assert v.name == "math"
    assert v.verify("The answer is \\boxed{4}", Task("t", "2+2?", "4", "math")).score == 1.0


def test_builtin_unit_tests_resolves_by_name() -> None:
    cls = resolve("unit_tests")
    assert cls.__name__ == "UnitTestVerifier"


def test_unknown_name_lists_available_names() -> None:
    with pytest.raises(UnknownVerifierError) as err:
        load("maths")
    message = str(err.value)
    assert "'maths'" in message and "math" in message and "unit_tests" in message and "module:Class" in message


def test_missing_module_and_attribute_are_named() -> None:
    with pytest.raises(UnknownVerifierError, match="cannot import module 'no_such_module'"):
        resolve("no_such_module:Thing")
    with pytest.raises(UnknownVerifierError, match="has no attribute 'Missing'"):
        resolve(f"{PATH}:Missing")


def test_class_without_verify_is_refused() -> None:
    with pytest.raises(UnknownVerifierError, match="not a verifier"):
        resolve(f"{PATH}:NotAVerifier")


def test_display_name_is_entry_point_or_class_name() -> None:
    assert display_name("math") == "math"
    assert display_name(f"{PATH}:EchoVerifier") == "EchoVerifier"


def test_verifiers_import_without_heavy_frameworks() -> None:
    # A fresh interpreter where importing torch, ray, deepspeed or vllm fails.
    code = (
        "import sys\n"
        "for m in ('torch', 'ray', 'deepspeed', 'vllm'): sys.modules[m] = None\n"
        "import verifiers, verifiers.registry, verifiers.pool, verifiers.config, verifiers.service, verifiers.cli\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
