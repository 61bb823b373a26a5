"""verifiers.sandbox: real sandboxed interpreters (bwrap, the unshare fallback, and no sandbox)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from verifiers import sandbox
from verifiers.sandbox import Limits, SandboxUnavailable, file_path, resolve_isolation, run_files, run_python

SANDBOXED = ("bwrap", "unshare")


def _available(mode: str) -> bool:
    try:
        return resolve_isolation(mode) == mode
    except SandboxUnavailable:
        return False


needs_bwrap = pytest.mark.skipif(not _available("bwrap"), reason="bubblewrap does not work here")
needs_unshare = pytest.mark.skipif(not _available("unshare"), reason="unshare fallback does not work here")
MODES = [pytest.param("bwrap", marks=needs_bwrap), pytest.param("unshare", marks=needs_unshare)]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP server on 127.0.0.1 (an ephemeral port) that nothing in a sandbox may reach."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _no_connection_arrived(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.mark.parametrize("mode", [*MODES, "none"])
def test_stdin_in_stdout_out_exit_code(mode: str) -> None:
    code = "import sys\nline = input()\nprint(line[::-1])\nprint('err', file=sys.stderr)\nsys.exit(3)\n"
    result = run_python(code, "abc\n", timeout_s=20, isolation=mode)
    assert (result.stdout, result.stderr.strip(), result.returncode) == ("cba\n", "err", 3)
    assert not result.timed_out and not result.output_exceeded


@pytest.mark.parametrize("mode", MODES)
def test_runs_as_unprivileged_uid_with_rlimits(mode: str) -> None:
    code = (
        "import os, resource as r\n"
        "print(os.getuid())\n"
        "status = dict(line.split(':\\t') for line in open('/proc/self/status').read().splitlines())\n"
        "print(int(status['CapEff'], 16) | int(status['CapPrm'], 16) | int(status['CapAmb'], 16))\n"
        "for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_CORE'):\n"
        "    print(r.getrlimit(getattr(r, name))[0])\n"
    )
    result = run_python(code, timeout_s=20, memory_mb=256, isolation=mode)
    mib = 1 << 20
    # no capabilities left (0); cpu = int(timeout_s) + 2 = 22; the other numbers are the Limits defaults.
    assert result.stdout.split() == ["65534", "0", str(256 * mib), "22", "32", str(16 * mib), "128", "0"]


@pytest.mark.parametrize("mode", MODES)
def test_network_is_unreachable(mode: str, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
    )
    result = run_python(code, timeout_s=20, isolation=mode)
    assert result.returncode != 0 and "connected" not in result.stdout
    assert _no_connection_arrived(listener)


@pytest.mark.parametrize("mode", [*MODES, "none"])
def test_wall_clock_deadline_kills_the_run(mode: str) -> None:
    result = run_python("import time\ntime.sleep(120)\n", timeout_s=1.0, isolation=mode)
    assert result.timed_out and result.returncode != 0
    assert result.wall_s < 120  # returned before the sleep could end: the run was killed, not waited out


@pytest.mark.parametrize("mode", [*MODES, "none"])
def test_output_over_the_cap_kills_the_run(mode: str) -> None:
    result = run_python(
        "while True:\n    print('x' * 999)\n", timeout_s=20, max_output_bytes=10_000, isolation=mode
    )
    assert result.output_exceeded and not result.timed_out
    assert len(result.stdout) + len(result.stderr) == 10_000  # truncated to the cap exactly


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_hits_the_process_limit(mode: str) -> None:
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError:\n"
        "    print(n)\n"
    )
    result = run_python(code, timeout_s=20, isolation=mode)
    # RLIMIT_NPROC = 32 counts this process too, and in bwrap-as-root mode nothing else of uid 65534
    # lives in the sandbox's own user namespace: at most 31 children.
    assert result.returncode == 0 and 0 < int(result.stdout) <= 31
    assert not result.timed_out  # the sleeping children were killed with the sandbox


@pytest.mark.parametrize("mode", MODES)
def test_memory_limit_raises_memory_error(mode: str) -> None:
    code = "try:\n    b = bytearray(600 << 20)\nexcept MemoryError:\n    print('refused')\n"
    result = run_python(code, timeout_s=20, memory_mb=256, isolation=mode)
    assert result.stdout.strip() == "refused"


@needs_bwrap
def test_bwrap_hides_host_files_and_keeps_them_unwritten() -> None:
    host_dir = Path(tempfile.mkdtemp(prefix="assay-test-host-"))
    try:
        host_dir.chmod(0o777)  # only the sandbox, not file permissions, may stop the write
        secret = host_dir / "secret.txt"
        secret.write_text("s3cret")
        secret.chmod(0o644)
        code = (
            f"import os\nprint(os.path.exists({str(secret)!r}))\n"
            f"try:\n    open({str(host_dir / 'planted.txt')!r}, 'w').write('x')\nexcept OSError as e:\n"
            "    print(type(e).__name__)\n"
            "print(sorted(os.listdir('/')))\n"
        )
        result = run_python(code, timeout_s=20, isolation="bwrap")
        lines = result.stdout.splitlines()
        assert lines[:2] == ["False", "FileNotFoundError"]
        assert "root" in lines[2] and "home" not in lines[2] and "etc" not in lines[2]
        assert not (host_dir / "planted.txt").exists()
    finally:
        shutil.rmtree(host_dir)


@needs_bwrap
def test_bwrap_tmp_is_writable_and_private_per_run() -> None:
    write = "open('/tmp/mark', 'w').write('1')\nimport os\nprint(os.getcwd(), os.path.exists('/tmp/mark'))\n"
    assert run_python(write, timeout_s=20, isolation="bwrap").stdout.split() == ["/tmp", "True"]
    again = "import os\nprint(os.path.exists('/tmp/mark'))\n"
    assert run_python(again, timeout_s=20, isolation="bwrap").stdout.strip() == "False"


@pytest.fixture
def host_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, world-traversable temp dir where run_files makes its per-run dirs."""
    path = Path(tempfile.mkdtemp(prefix="assay-test-tmp-", dir="/tmp"))
    path.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("mode", [*MODES, "none"])
def test_files_and_args_reach_the_program_and_host_dir_is_removed(mode: str, host_tmp: Path) -> None:
    files = {"main.py": "import sys\nprint(open(sys.argv[1]).read(), sys.argv[2])\n", "data.txt": "hello"}
    result = run_files(
        files,
        "main.py",
        args=(file_path("data.txt", mode), "world"),
        limits=Limits(timeout_s=20),
        isolation=mode,
    )
    assert result.stdout.strip() == "hello world"
    assert list(host_tmp.iterdir()) == []


def test_auto_falls_back_to_unshare_without_bwrap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not _available("unshare"):
        pytest.skip("unshare fallback does not work here")
    for tool in ("unshare", "prlimit", "setpriv"):  # a PATH that has everything but bwrap
        os.symlink(shutil.which(tool) or tool, tmp_path / tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._probe.cache_clear()
    try:
        assert resolve_isolation("auto") == "unshare"
        result = run_python("import os\nprint(os.getuid())\n", timeout_s=20, isolation="auto")
        assert result.stdout.strip() == "65534"
    finally:
        sandbox._probe.cache_clear()  # the next caller probes with the real PATH again


def test_no_working_sandbox_is_an_error_never_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither bwrap nor unshare
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="bwrap: missing bwrap"):
            resolve_isolation("auto")
    finally:
        sandbox._probe.cache_clear()


def test_bad_arguments_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="isolation='docker'"):
        run_python("", isolation="docker")
    with pytest.raises(ValueError, match="without '/'"):
        run_files({"../x.py": ""}, "../x.py", isolation="none")
    with pytest.raises(ValueError, match="main script 'b.py'"):
        run_files({"a.py": ""}, "b.py", isolation="none")


def test_dirs_left_by_killed_runs_are_swept(host_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale, fresh = host_tmp / "assay-sbx-stale", host_tmp / "assay-sbx-fresh"
    for d in (stale, fresh):
        d.mkdir()
        (d / "main.py").write_text("")
    two_hours_ago = time.time() - 7200  # older than the 1 h staleness bound
    os.utime(stale, (two_hours_ago, two_hours_ago))
    monkeypatch.setattr(sandbox, "_last_sweep", 0.0)
    assert run_python("print(1)", timeout_s=20, isolation="none").stdout == "1\n"
    assert sorted(p.name for p in host_tmp.iterdir()) == ["assay-sbx-fresh"]
