"""The console is for people: the progress bar, Assay's own `[assay]` lines and real warnings.

Everything else a run's processes print (vLLM, DeepSpeed, Ray, transformers, torch: hundreds of INFO
and WARNING lines, most from the actors) goes to `third_party.log` in the stage's run directory.

How. Ray ships every actor's stdout and stderr to the driver (`log_to_driver`), where one printer
writes them to the console with a `(LearnerActor pid=N)` prefix. `route_ray` replaces that printer
with `_worker_lines`, which sends a line to the console only when it is ours (it starts with
`[assay]`, or it is a Python warning raised in Assay's own code) and every other line, prefix kept, to
the file. The actors themselves are untouched, and lines from actors on other nodes reach the same
file. In the driver, third-party `logging` records and Python warnings from outside Assay's packages
go to the file as well; records at ERROR or above also reach the console.

`assay --verbose` (or `ASSAY_VERBOSE=1`) turns all of this off: everything on the console, as Ray
prints it. So does using the engine as a library: nothing is routed until `quiet()` is called, which
only the `assay` command does, and `restore()` undoes it.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

LOG_NAME = "third_party.log"
# Assay's packages: their loggers and warnings are for people.
OURS = ("engine", "learner", "rollout", "verifiers", "weights", "bench")
# `path/learner/worker.py:196: UserWarning: ...`, as `warnings` prints it, from one of our packages.
_OUR_WARNING = re.compile(r"(?:^|/)(?:" + "|".join(OURS) + r")/[\w/]+\.py:\d+: \w+: ")
_REPO = Path(__file__).resolve().parents[1]
_HELD_LINES = 20_000  # lines kept in memory before the run directory exists; older ones are dropped


class _Sink:
    """The third-party log: held in memory until the run directory exists, then appended to the file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # Ray's log thread and the main thread both write
        self.path: Path | None = None
        self.file: TextIO | None = None
        self.held: list[str] = []

    def expect(self, path: Path) -> None:
        with self.lock:
            self._close()
            self.path = path

    def open(self) -> Path | None:
        with self.lock:
            if self.file is None and self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = self.path.open("a", buffering=1)
                self.file.writelines(self.held)
                self.held = []
            return self.path if self.file is not None else None

    def write(self, text: str) -> None:
        with self.lock:
            if self.file is not None:
                self.file.write(text)
            else:
                self.held.append(text)
                del self.held[:-_HELD_LINES]

    def close(self) -> None:
        with self.lock:
            self._close()
            self.path = None
            self.held = []

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _Handler(logging.Handler):
    """The root handler while quiet: third-party records to the file (ERROR and above to the console
    too), our own WARNING and above to the console."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.setFormatter(logging.Formatter("(driver) %(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            ours = record.name.split(".")[0] in OURS
            if not ours:
                self.sink.write(text + "\n")
            if record.levelno >= logging.ERROR or ours and record.levelno >= logging.WARNING:
                _to_console(text.removeprefix("(driver) "), err=True)
        except Exception:  # noqa: BLE001 -- logging must never raise into the caller
            self.handleError(record)


class _State:
    def __init__(self) -> None:
        self.sink = _Sink()
        self.handler = _Handler(self.sink)
        self.loggers: dict[str, tuple[list[logging.Handler], bool]] = {}  # name -> its handlers, propagate
        self.showwarning: Any = None
        self.ray_printers: list[tuple[str, Any]] = []


_state: _State | None = None


def quiet() -> None:
    """Start routing third-party output away from the console (the `assay` command, unless --verbose)."""
    global _state
    if _state is not None:
        return
    _state = _State()
    logging.getLogger().addHandler(_state.handler)
    _state.showwarning = warnings.showwarning
    warnings.showwarning = _showwarning
    route_loggers()


def is_quiet() -> bool:
    return _state is not None


def expect_log(path: Path) -> None:
    """The stage's third-party log. Output is held in memory until `open_log` (the run directory is
    made, or an earlier one moved aside, only once every input is checked)."""
    if _state is not None:
        _state.sink.expect(path)


def open_log() -> Path | None:
    """Open the expected log (its directory exists by now) and write what was held; its path, if any."""
    if _state is None:
        return None
    route_loggers()  # libraries imported since quiet() may have added their own handlers
    return _state.sink.open()


def log_path() -> Path | None:
    """The third-party log being written, if any."""
    return _state.sink.path if _state is not None and _state.sink.file is not None else None


def route_loggers() -> None:
    """Send every third-party logger's records to the root handler (the file): libraries attach their
    own console handlers (Ray, transformers, vLLM, DeepSpeed), often with propagation off."""
    if _state is None:
        return
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] in OURS:
            continue
        if logger.handlers or not logger.propagate:
            _state.loggers.setdefault(name, (list(logger.handlers), logger.propagate))
            logger.handlers = []
            logger.propagate = True


def route_ray() -> None:
    """Replace Ray's printer of the workers' output with `_worker_lines` (call after `ray.init`)."""
    if _state is None or _state.ray_printers:
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without it: its printer stays
        return
    with dispatcher._lock:
        _state.ray_printers = [pair for pair in dispatcher.handlers if pair[0] == "ray_print_logs"]
    if _state.ray_printers:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("assay_worker_lines", _worker_lines)
    route_loggers()  # ray.init configures Ray's loggers


def restore() -> None:
    """Undo `quiet()`: the loggers, `warnings` and Ray's printer as they were; the log file closed."""
    global _state
    if _state is None:
        return
    state, _state = _state, None
    if state.ray_printers:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler("assay_worker_lines")
        for name, printer in state.ray_printers:
            dispatcher.add_handler(name, printer)
    for name, (handlers, propagate) in state.loggers.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate
    logging.getLogger().removeHandler(state.handler)
    if warnings.showwarning is _showwarning:
        warnings.showwarning = state.showwarning
    state.sink.close()


def for_people(line: str) -> bool:
    """True for a worker's line a person must see: ours (`[assay] ...`) or a warning from our code."""
    return line.startswith("[assay]") or (_OUR_WARNING.search(line) is not None and "-packages/" not in line)


def _worker_lines(data: dict[str, Any]) -> None:
    """Ray's dispatcher calls this with a batch of one worker's lines (`data["lines"]`)."""
    if _state is None:
        return
    pid = data.get("pid")
    name = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = "" if ip == data.get("localhost") else f", ip={ip}"
    if pid == "autoscaler":  # its status every 5 s; only its events (as Ray shows them), warnings on the console
        from ray._private.worker import filter_autoscaler_events

        for event in filter_autoscaler_events(data.get("lines", [])):
            if "Warning:" in event or "Error:" in event:
                _to_console(f"(autoscaler) {event}", err=True)
            _state.sink.write(f"(autoscaler) {event}\n")
        return
    prefix = f"({pid}{where}) " if pid == "raylet" else f"({name + ' ' if name else ''}pid={pid}{where}) "
    for line in data.get("lines", []):
        if pid != "raylet" and for_people(line):
            _to_console(prefix + line, err=bool(data.get("is_err")))
        else:
            _state.sink.write(prefix + line + "\n")


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """`warnings.showwarning` while quiet: ours on the console as usual, the rest to the file."""
    if _is_ours(filename) and _state is not None:
        _state.showwarning(message, category, filename, lineno, file, line)
    elif _state is not None:
        _state.sink.write("(driver) " + warnings.formatwarning(message, category, filename, lineno, line))


def _is_ours(filename: str) -> bool:
    try:
        relative = Path(filename).resolve().relative_to(_REPO)
    except ValueError:
        return False
    return relative.parts[0] in OURS


def _to_console(text: str, err: bool) -> None:
    tqdm.write(text, file=sys.stderr if err else sys.stdout)  # above the progress bar, which it redraws
