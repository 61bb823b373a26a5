"""Find a verifier by name: entry points in the group `assay.verifiers`, or a `module:Class` path.

Built-ins (`math`, `unit_tests`) are registered as entry points in our own `pyproject.toml`, so a
built-in and a third-party verifier take the same code path (vLLM's plugin loader does the same).
A `module:Class` path is for a verifier in a file that is not packaged yet (tests use it).
`load_object` is that path loader for every plug-in: the engine loads task sources and collectors
given by path with it too (it lives here because `verifiers/` imports nothing of the engine).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from verifiers.base import Verifier

GROUP = "assay.verifiers"


class UnknownVerifierError(LookupError):
    """No entry point and no importable `module:Class` under that name."""


class LoadError(LookupError):
    """A `module:attr` path whose module cannot be imported or lacks the attribute."""


def available() -> list[str]:
    """The names registered in the `assay.verifiers` entry-point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def resolve(name_or_path: str) -> type:
    """The verifier class for an entry-point name or a `module:Class` path (nothing is built)."""
    for ep in entry_points(group=GROUP):
        if ep.name == name_or_path:
            try:
                obj = ep.load()
            except ImportError as exc:
                raise UnknownVerifierError(
                    f"verifier entry point {name_or_path!r} ({ep.value}) cannot be imported: {exc}"
                ) from exc
            return _checked(obj, f"entry point {name_or_path!r} ({ep.value})")
    if ":" in name_or_path:
        try:
            target = load_object(name_or_path)
        except LoadError as exc:
            raise UnknownVerifierError(f"verifier {name_or_path!r}: {exc}") from exc
        return _checked(target, f"verifier {name_or_path!r}")
    raise UnknownVerifierError(
        f"unknown verifier {name_or_path!r}: expected one of the entry points in group {GROUP!r} "
        f"({', '.join(available()) or 'none installed'}) or a 'module:Class' path"
    )


def load_object(path: str) -> Any:
    """What a `module:attr` path names (`attr` may be dotted: `Outer.Inner`), nothing built: the one
    loader of plug-ins given by path (verifiers, `task.source`, `rl.collector`). Raises LoadError naming
    the module or the attribute that is missing."""
    module_name, colon, attr = path.partition(":")
    if not colon or not module_name or not attr:
        raise LoadError(f"{path!r} is not a 'module:Class' path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadError(f"cannot import module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise LoadError(f"cannot load {attr!r} from {module_name!r}: it has no attribute {part!r}")
        target = getattr(target, part)
    return target


def load(name_or_path: str, **options: Any) -> Verifier:
    """Build the verifier named by an entry point (`math`) or a path (`pkg.mod:MyVerifier`)."""
    return resolve(name_or_path)(**options)


def display_name(name_or_path: str) -> str:
    """The short name used in metric keys: the entry-point name, or the class name of a path."""
    return name_or_path.rpartition(":")[2] if ":" in name_or_path else name_or_path


def _checked(obj: Any, what: str) -> type:
    if not callable(obj) or not callable(getattr(obj, "verify", None)):
        raise UnknownVerifierError(f"{what} is not a verifier class (needs a `verify(response, task)` method)")
    return obj
