"""One line for any error that ends a command: what failed, where, and why — the traceback only with
`--debug`.

Our own errors already name the key, file, line or path in their message; this module only picks the
line to show: the exception's own first line, the remote cause of a Ray task error (instead of Ray's
multi-line wrapper), and for an actor that died, its role, the step and the exit cause Ray reports.
"""

from __future__ import annotations

import re

# Ray actor class -> the role a user knows it by.
ROLES = {"LearnerActor": "learner", "RolloutActor": "rollout actor", "VerifierPoolActor": "verifier pool",
         "CriticActor": "critic"}

_step_running: int | None = None


def step_started(step: int) -> None:
    """Record the 1-based step a stage is running, for messages about failures during it."""
    global _step_running
    _step_running = step


def step_finished() -> None:
    global _step_running
    _step_running = None


def one_line(err: BaseException) -> str:
    """The message a user sees for `err`, on one line."""
    try:
        from ray.exceptions import RayActorError, RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency of the engine
        RayActorError = RayTaskError = ()  # type: ignore[assignment,misc]
    if isinstance(err, RayActorError):
        return _actor_died(err)
    if isinstance(err, RayTaskError):
        cause = err.cause if isinstance(err.cause, BaseException) else None
        title = re.search(r"ray::(\w+)\.", str(err))  # the first line names "ray::LearnerActor.fail()"
        role = ROLES.get(title.group(1), "") if title else ""
        inner = one_line(cause) if cause is not None else _first_line(str(err))
        return f"{role} failed{_during()}: {inner}" if role else inner
    text = _first_line(str(err))
    if text and isinstance(err, (OSError, LookupError, ValueError)) and type(err).__name__ not in text:
        known = type(err).__module__.startswith(("engine", "verifiers", "learner", "rollout"))
        return text if known else f"{type(err).__name__}: {text}"
    return text or type(err).__name__


def _actor_died(err: BaseException) -> str:
    text = str(err)
    match = re.search(r"class_name:\s*(\w+)", text)
    role = ROLES.get(match.group(1), match.group(1)) if match else "an actor"
    detail = re.search(r"(?:Worker exit detail|exit detail):\s*(.+)", text)
    cause = (detail.group(1) if detail else _first_line(text)).split(" Some common causes")[0].strip()
    return f"the {role} process died{_during()}: {cause}"


def _during() -> str:
    return f" during step {_step_running}" if _step_running is not None else ""


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""
