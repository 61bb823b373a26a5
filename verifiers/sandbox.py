"""Run untrusted Python (model output) in a throwaway sandbox and report what it did.

Every run is a fresh `python -I` of the *base* interpreter (`sys._base_executable`: programs get
the stdlib, never the venv's packages) inside bubblewrap (`bwrap`): new pid, net, ipc, uts and mount
namespaces; the new root holds only read-only binds of `/usr` (plus the `/bin`, `/lib*` links) and the
interpreter prefix, a size-capped tmpfs `/tmp` as the working directory, a minimal private `/dev` and
a fresh `/proc`. The files of a run (the program, a harness) are written to a per-run host temp dir
that is bound read-only at `/assay` and removed afterwards.

The sandbox never degrades in silence. bwrap is the only isolation a verifier, task source or tool
can be configured with (`isolation: auto | bwrap`; `auto` means bwrap and nothing weaker), because it
is the only mode that holds the whole attack battery (`tests/verifiers/test_sandbox.py`) when host
directories are world-writable, i.e. when nothing but the sandbox stands in the way. Where bwrap is
missing or does not work, `resolve_isolation` raises `SandboxUnavailable` with one line naming what
is missing and how to get it (`apt-get install bubblewrap`, or `make install`, which does it); the
verifiers call it when they are built, so a pool reports it as the verifier's build failure. Two
modes are deliberately not offered:
- `unshare` (a former fallback: `unshare --user --net --pid`) kept the host filesystem visible and
  writable as uid 65534: a program wrote, created and read files in any host directory whose
  permissions allowed it. Making it hold the battery means re-implementing bwrap's private root
  (mount namespace, pivot_root, read-only binds) in shell, so it was removed; configs naming it get
  a `ValueError` that says so.
- `none`: a plain `subprocess` of `python -I` with the same wall clock and output cap and nothing
  else. It exists only to measure the price of isolation (`bench/verifiers.py`): `run_files` and
  `run_python` accept it, `resolve_isolation` (the config path of every verifier and task source)
  refuses it.

The program runs as uid 65534 with these rlimits (set by `prlimit` right before the interpreter
starts): address space, CPU seconds, processes, file size, open files, no core dumps. Running as root
needs care, measured on this kernel (6.18): `RLIMIT_NPROC` is never enforced for kernel uid 0, and
`bwrap --unshare-user --uid 65534` started by root still runs the program as kernel uid 0 (a
40-process limit let a fork loop make 200 processes). So when we are root, bwrap runs without a user
namespace, keeps only CAP_SETUID/CAP_SETGID, and the program is started through `setpriv
--reuid=65534 --regid=65534 --clear-groups` (which drops every capability) and then `unshare --user`,
so that the process limit is counted per sandbox (in the sandbox's own user namespace) and one fork
bomb cannot starve concurrent runs. Started by a non-root user, bwrap makes the user namespace itself
(`--unshare-user --uid 65534`).

The parent enforces the wall-clock deadline by killing the sandbox's pid 1 (the kernel then kills
everything in its pid namespace), waiting for the teardown, then killing the process group as a
backstop, so no sandbox process outlives `run_files`. It drains stdout and stderr while the child
runs into a bounded buffer (over `max_output_bytes` in total: killed, `output_exceeded=True`), and
decides nothing itself: callers (`verifiers.unit_tests`) judge the `RunResult`.

What it protects against: fork bombs, memory bombs, infinite loops and sleeps, floods of output,
network access of any kind (only a private loopback exists), reading host files outside the bound
system directories (home directories, `/etc`, `/tmp`, the project), writing anywhere on the host
(world-writable host dirs such as `/tmp`, `/var/tmp` and `/dev/shm` included: the sandbox's own
`/tmp` and `/dev` are private), signalling or seeing host processes (pid namespace), core dumps,
leftover processes (the namespace dies with the run).

What it does NOT protect against: kernel exploits (the program shares the host kernel; there is no
seccomp filter); reading anything under `/usr` and the interpreter prefix; filling the tmpfs (capped
at `tmpfs_mb`) or using CPU and memory up to the limits; side channels (timing, /proc of the
sandbox itself). `RLIMIT_AS` limits address space, not resident memory, so programs that map a lot
but touch little can still be refused early.
"""

from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

ISOLATIONS = ("auto", "bwrap")  # what a verifier, task source or tool may be configured with
UNSANDBOXED = "none"  # `run_files` only, for bench/verifiers.py; never a config choice
SANDBOX_UID = 65534  # "nobody"
WORK_MOUNT = "/assay"  # where the per-run files appear inside a bwrap sandbox
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_READ_CHUNK = 1 << 16
_REAP_S = 5.0  # how long a killed sandbox may take to tear down its pid namespace
_DIR_PREFIX = "assay-sbx-"
_STALE_S = 3600.0  # a per-run host dir this old belongs to a run that was killed (timeouts are seconds)
_last_sweep = 0.0
# The tools a run starts (setpriv and unshare only when we are root) and the Debian/Ubuntu package of each.
_PACKAGES = {"bwrap": "bubblewrap", "prlimit": "util-linux", "setpriv": "util-linux", "unshare": "util-linux"}


class SandboxUnavailable(RuntimeError):
    """bubblewrap (or a tool it needs) is missing or does not work here; the message is one line that
    names what is missing and how to get it."""


@dataclass(frozen=True)
class RunResult:
    """What one sandboxed run did.

    `returncode` is the exit status of the started process: the program's own in `none` mode;
    bwrap passes the program's status through and reports a program killed by a signal as
    128 + signal (137 for SIGKILL). After a kill by the parent (`timed_out`, `output_exceeded`) it
    is nonzero but otherwise meaningless.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    output_exceeded: bool
    wall_s: float


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run (the rlimits apply to every process inside the sandbox)."""

    timeout_s: float = 10.0
    """Wall-clock deadline; the parent kills the whole sandbox when it passes."""
    memory_mb: int = 512
    """RLIMIT_AS (address space) per process, in MiB."""
    max_output_bytes: int = 1 << 20
    """Cap on stdout + stderr together; over it the run is killed."""
    nproc: int = 32
    """RLIMIT_NPROC: processes and threads of the sandbox's uid (per sandbox, see module docstring)."""
    fsize_mb: int = 16
    """RLIMIT_FSIZE: largest file a process may write, in MiB."""
    nofile: int = 128
    """RLIMIT_NOFILE: open file descriptors per process."""
    tmpfs_mb: int = 64
    """Size of the writable tmpfs working directory."""

    @property
    def cpu_s(self) -> int:
        """RLIMIT_CPU: a backstop behind the wall clock (CPU time of one process)."""
        return int(self.timeout_s) + 2


def run_python(
    code: str,
    stdin: str | bytes = "",
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_output_bytes: int = 1 << 20,
    isolation: str = "auto",
) -> RunResult:
    """Run `code` as a script (`__name__ == "__main__"`) with `stdin`, isolated as `isolation` says
    (`auto`/`bwrap`, or `none` for the bench's unsandboxed baseline)."""
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    return run_files({"main.py": code}, "main.py", stdin, limits=limits, isolation=isolation)


def run_files(
    files: Mapping[str, str],
    main: str,
    stdin: str | bytes = "",
    *,
    args: tuple[str, ...] = (),
    limits: Limits = Limits(),
    isolation: str = "auto",
) -> RunResult:
    """Write `files` (flat names) to a fresh dir, run `python -I <main> *args` there, remove the dir.

    Inside the sandbox the files are read-only; `args` may name them through `file_path`. `isolation`
    is `auto`/`bwrap`, or `none` (no sandbox: only the bench's price-of-isolation baseline uses it).
    """
    mode = _mode(isolation)
    for name in files:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"run_files: file name {name!r} must be a plain name without '/'")
    if main not in files:
        raise ValueError(f"run_files: main script {main!r} is not one of the files {sorted(files)}")
    _sweep_stale_dirs(tempfile.gettempdir())
    host_dir = tempfile.mkdtemp(prefix=_DIR_PREFIX)
    try:
        for name, text in files.items():
            with open(os.path.join(host_dir, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.geteuid() == 0 and mode != "none":  # the sandbox runs as uid 65534 and must read them
            for name in (*files, ""):
                os.chown(os.path.join(host_dir, name), SANDBOX_UID, SANDBOX_UID)
        argv = _command(mode, host_dir, main, args, limits)
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        return _execute(argv, host_dir, data, limits)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def _sweep_stale_dirs(base: str) -> None:
    """Remove per-run dirs left by processes that were SIGKILLed mid-run (a pool worker past its
    timeout never reaches its `finally`). Only dirs older than `_STALE_S` go, at most every 10 min."""
    global _last_sweep
    now = time.time()
    if now - _last_sweep < 600:
        return
    _last_sweep = now
    try:
        entries = [
            e for e in os.scandir(base) if e.name.startswith(_DIR_PREFIX) and e.is_dir(follow_symlinks=False)
        ]
    except OSError:
        return
    for entry in entries:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_S:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass


def file_path(name: str, isolation: str) -> str:
    """Where a file passed to `run_files` appears inside a run of that isolation mode, for `args`.

    bwrap binds the files at a fixed place; `none` runs in the host dir and uses paths relative to it.
    """
    return f"{WORK_MOUNT}/{name}" if _mode(isolation) == "bwrap" else name


def resolve_isolation(isolation: str) -> str:
    """The mode a configured `isolation` runs in: always `bwrap` (`auto` means bwrap and nothing
    weaker), or `SandboxUnavailable` (one line: what is missing, how to get it). Never `none`."""
    if isolation == "unshare":
        raise ValueError(
            "isolation='unshare' is no longer offered: it left the host filesystem writable (only file "
            f"permissions stood in the way); expected one of {ISOLATIONS}, which need bubblewrap "
            "(`apt-get install bubblewrap`, or `make install`, which does it)"
        )
    if isolation == UNSANDBOXED:
        raise ValueError(
            "isolation='none' runs model-written code with no sandbox at all: it is not a config choice "
            "(only bench/verifiers.py uses it, through run_files, to measure the price of isolation); "
            f"expected one of {ISOLATIONS}"
        )
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation={isolation!r}: expected one of {ISOLATIONS}")
    problem = _probe()
    if problem is not None:
        raise SandboxUnavailable(f"no sandbox for model-written code: {problem}")
    return "bwrap"


def _mode(isolation: str) -> str:
    """What `run_files` runs: `none` as asked (the bench's baseline), anything else as configured."""
    return UNSANDBOXED if isolation == UNSANDBOXED else resolve_isolation(isolation)


@functools.cache
def _probe() -> str | None:
    """None if bwrap runs a trivial program correctly on this machine, else why not, as the rest of a
    one-line message that says how to fix it (cached: the answer does not change within a process)."""
    tools: tuple[str, ...] = ("bwrap", "prlimit")
    if os.geteuid() == 0:
        tools += ("setpriv", "unshare")  # as root the program is started through both (module docstring)
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        names = ", ".join(f"`{t}` ({_PACKAGES[t]})" for t in missing)
        packages = " ".join(dict.fromkeys(_PACKAGES[t] for t in missing))  # bubblewrap first, once each
        make = ", or `make install`, which does it" if "bwrap" in missing else ""
        return f"{names} not found on PATH; install with `apt-get install {packages}`{make}"
    host_dir = tempfile.mkdtemp(prefix=_DIR_PREFIX + "probe-")
    try:
        with open(os.path.join(host_dir, "probe.py"), "w") as f:
            f.write("print(6 * 7)\n")
        if os.geteuid() == 0:
            os.chown(host_dir, SANDBOX_UID, SANDBOX_UID)
            os.chown(os.path.join(host_dir, "probe.py"), SANDBOX_UID, SANDBOX_UID)
        limits = Limits(timeout_s=30.0)
        result = _execute(_command("bwrap", host_dir, "probe.py", (), limits), host_dir, b"", limits)
    except OSError as exc:
        return f"bubblewrap (bwrap) cannot be started: {exc}"
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
    if result.returncode != 0 or result.stdout.strip() != "42":
        why = " ".join(result.stderr.split())[-300:] or "no error output"
        return (
            f"bubblewrap (bwrap) is installed but does not work here (exit {result.returncode}: {why}); it "
            "needs unprivileged user namespaces, or root with CAP_SYS_ADMIN (a privileged container)"
        )
    return None


def _sandbox_python() -> str:
    """The base interpreter (not the venv's): its prefix is bound read-only into the sandbox."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _command(mode: str, host_dir: str, main: str, args: tuple[str, ...], limits: Limits) -> list[str]:
    """argv of one run (started with the host dir as its cwd)."""
    python = _sandbox_python()
    if mode == UNSANDBOXED:
        return [python, "-I", main, *args]
    root = os.geteuid() == 0
    inner = [*_prlimit_argv(limits), python, "-I"]
    if root:
        inner = [
            "setpriv",
            f"--reuid={SANDBOX_UID}",
            f"--regid={SANDBOX_UID}",
            "--clear-groups",
            "unshare",
            "--user",
            *inner,
        ]
    return [*_bwrap_argv(host_dir, python, limits, root), *inner, f"{WORK_MOUNT}/{main}", *args]


def _prlimit_argv(limits: Limits) -> list[str]:
    mib = 1 << 20
    return [
        "prlimit",
        f"--as={limits.memory_mb * mib}",
        f"--cpu={limits.cpu_s}",
        f"--nproc={limits.nproc}",
        f"--fsize={limits.fsize_mb * mib}",
        f"--nofile={limits.nofile}",
        "--core=0",
        "--",
    ]


def _bwrap_argv(host_dir: str, python: str, limits: Limits, root: bool) -> list[str]:
    argv = [
        shutil.which("bwrap") or "bwrap",  # the one `_probe` checked (the run's own PATH is /usr/bin:/bin)
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ]
    if root:  # no user namespace (see the module docstring); setpriv needs these two, then drops all
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    for key, value in {**_ENV, "HOME": "/tmp"}.items():
        argv += ["--setenv", key, value]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    prefix = os.path.dirname(os.path.dirname(python))  # .../bin/python3.11 -> prefix
    if not any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS):
        parts = prefix.split("/")
        for i in range(2, len(parts)):  # parents of the prefix, world-traversable inside
            argv += ["--perms", "0755", "--dir", "/".join(parts[:i])]
        argv += ["--ro-bind", prefix, prefix]
    argv += [
        "--perms", "0755", "--dir", WORK_MOUNT, "--ro-bind", host_dir, WORK_MOUNT,
        "--perms", "1777", "--size", str(limits.tmpfs_mb << 20), "--tmpfs", "/tmp",
        "--dev", "/dev", "--proc", "/proc", "--chdir", "/tmp",
    ]  # fmt: skip
    return argv


def _execute(argv: list[str], cwd: str, stdin: bytes, limits: Limits) -> RunResult:
    """Start `argv` in its own session, feed stdin, drain output under the caps, kill it at the deadline."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
        env={**_ENV, "HOME": cwd}, start_new_session=True, close_fds=True,
    )  # fmt: skip
    try:
        out, err, timed_out, exceeded = _pump(proc, stdin, start + limits.timeout_s, limits.max_output_bytes)
        if not (timed_out or exceeded):
            try:
                proc.wait(timeout=max(0.0, start + limits.timeout_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        _stop(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    wall_s = time.monotonic() - start
    return RunResult(
        returncode=proc.returncode,
        stdout=bytes(out).decode("utf-8", "replace"),
        stderr=bytes(err).decode("utf-8", "replace"),
        timed_out=timed_out,
        output_exceeded=exceeded,
        wall_s=wall_s,
    )


def _pump(
    proc: subprocess.Popen[bytes], stdin: bytes, deadline: float, cap: int
) -> tuple[bytearray, bytearray, bool, bool]:
    """Write stdin and read stdout/stderr until both close, the deadline passes, or output exceeds `cap`."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    sel = selectors.DefaultSelector()
    for fd in sinks:
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    open_reads = len(sinks)
    try:
        while open_reads:
            left = deadline - time.monotonic()
            if left <= 0:
                return out, err, True, False
            for key, _ in sel.select(timeout=left):
                fd = key.fd
                if fd in sinks:
                    chunk = os.read(fd, _READ_CHUNK)
                    if not chunk:
                        sel.unregister(fd)
                        open_reads -= 1
                        continue
                    sinks[fd] += chunk
                    if len(out) + len(err) > cap:
                        del out[cap:], err[max(0, cap - len(out)) :]
                        return out, err, False, True
                else:
                    try:
                        pending = pending[os.write(fd, pending[:_READ_CHUNK]) :]
                    except (BrokenPipeError, BlockingIOError) as exc:
                        if isinstance(exc, BlockingIOError):
                            continue
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
        return out, err, False, False
    finally:
        sel.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill what is left of a run and return only when all of it is gone.

    The outer process (bwrap) waits for the sandbox's pid-1 and then exits, and a pid-1
    exits only after the kernel has killed and reaped every other process of its namespace. So we
    SIGKILL the pid-1s (the outer process's children) first and wait for the outer process; killing
    the outer process first would leave the namespace dying in the background. The process group
    kill afterwards is the backstop (and all there is in `none` mode).
    """
    killed = 0
    if proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    if killed:
        try:
            proc.wait(timeout=_REAP_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []
