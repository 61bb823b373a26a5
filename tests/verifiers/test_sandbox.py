"""verifiers.sandbox: real sandboxed interpreters (bwrap, and no sandbox for the bench), refusal without
bubblewrap, and the `make install` step that installs it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from verifiers import sandbox
from verifiers.sandbox import Limits, SandboxUnavailable, file_path, resolve_isolation, run_files, run_python


def _problem(mode: str) -> str | None:
    try:
        return None if resolve_isolation(mode) == mode else f"{mode} resolves to something else"
    except SandboxUnavailable as exc:
        return str(exc)


needs_bwrap = pytest.mark.skipif(
    _problem("bwrap") is not None, reason=f"bubblewrap does not work here: {_problem('bwrap')}"
)
MODES = [pytest.param("bwrap", marks=needs_bwrap)]


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


# ---------------------------------------------------------------------------------------------- no silent downgrade

OFFERED = [
    pytest.param(m, marks=needs_bwrap) if m == "bwrap" else m for m in sandbox.ISOLATIONS if m != "auto"
]


@pytest.fixture
def world_writable_dir() -> Iterator[Path]:
    """A host dir anyone may write (mode 1777, like /tmp), holding a readable secret and a writable file:
    file permissions allow every attack, so only the sandbox can stand in the way."""
    path = Path(tempfile.mkdtemp(prefix="assay-test-host-", dir="/tmp"))
    path.chmod(0o1777)
    (path / "secret.txt").write_text("hunter2-secret")
    (path / "secret.txt").chmod(0o644)
    (path / "victim.txt").write_text("untouched")
    (path / "victim.txt").chmod(0o666)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("mode", OFFERED)
def test_every_offered_mode_holds_the_file_attacks_in_world_writable_host_dirs(
    mode: str, world_writable_dir: Path
) -> None:
    host = world_writable_dir
    mark = f"assay-planted-{uuid.uuid4().hex[:12]}"
    shared = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]  # world-writable on most hosts
    code = (
        "import json, os\n"
        f"host, mark, shared = {str(host)!r}, {mark!r}, {shared!r}\n"
        "attacks = {\n"
        "    'read': lambda: open(os.path.join(host, 'secret.txt')).read(),\n"
        "    'list': lambda: os.listdir(host),\n"
        "    'create': lambda: open(os.path.join(host, mark), 'w').write('x'),\n"
        "    'overwrite': lambda: open(os.path.join(host, 'victim.txt'), 'w').write('pwned'),\n"
        "    'append': lambda: open(os.path.join(host, 'victim.txt'), 'a').write('pwned'),\n"
        "    'mkdir': lambda: os.mkdir(os.path.join(host, mark + '.d')),\n"
        "    'rename': lambda: os.rename(os.path.join(host, 'victim.txt'), os.path.join(host, mark + '.mv')),\n"
        "}\n"
        "out = {}\n"
        "for name, attack in attacks.items():\n"
        "    try:\n"
        "        out[name] = repr(attack())[:80]\n"
        "    except OSError as e:\n"
        "        out[name] = 'refused: ' + type(e).__name__\n"
        "for d in shared:  # the sandbox may have a private dir of that name: the host must not see it\n"
        "    try:\n"
        "        open(os.path.join(d, mark), 'w').write('x')\n"
        "    except OSError:\n"
        "        pass\n"
        "print(json.dumps(out))\n"
    )
    result = run_python(code, timeout_s=20, isolation=mode)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert {k: v for k, v in outcome.items() if not v.startswith("refused")} == {}
    assert sorted(p.name for p in host.iterdir()) == ["secret.txt", "victim.txt"]
    assert (host / "victim.txt").read_text() == "untouched"
    assert [d for d in shared if os.path.exists(os.path.join(d, mark))] == []


@pytest.fixture
def no_bwrap_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A PATH with every tool the sandbox uses but bubblewrap, as on a fresh machine."""
    for tool in ("unshare", "prlimit", "setpriv"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, tmp_path / tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._probe.cache_clear()
    yield
    sandbox._probe.cache_clear()  # the next caller probes with the real PATH again


def _build_unit_tests() -> object:
    from verifiers.unit_tests import UnitTestVerifier

    return UnitTestVerifier()


def _build_code_output() -> object:
    from verifiers.code_output import CodeOutputVerifier

    return CodeOutputVerifier()


@pytest.mark.parametrize(
    "build",
    [
        lambda: resolve_isolation("auto"),
        lambda: resolve_isolation("bwrap"),
        _build_unit_tests,
        _build_code_output,
    ],
    ids=["auto", "bwrap", "unit_tests", "code_output"],
)
def test_without_bwrap_building_refuses_with_one_line_naming_the_fix(
    build: Callable[[], object], no_bwrap_on_path: None
) -> None:
    with pytest.raises(SandboxUnavailable) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    assert "bubblewrap" in message and "apt-get install bubblewrap" in message and "make install" in message


def test_a_broken_bwrap_refuses_with_one_line_saying_why(no_bwrap_on_path: None) -> None:
    bin_dir = os.environ["PATH"]  # the fixture's PATH: add a bwrap that fails as in a locked-down container
    stub = Path(bin_dir) / "bwrap"
    stub.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    stub.chmod(0o755)
    with pytest.raises(SandboxUnavailable) as info:
        resolve_isolation("auto")
    message = str(info.value)
    assert "\n" not in message
    assert "does not work here (exit 1: bwrap: No permissions to create new namespace)" in message


@pytest.mark.parametrize("isolation", ["unshare", "none"])
def test_weaker_modes_are_not_offered_to_configs(isolation: str) -> None:
    from verifiers.code_output import CodeOutputVerifier
    from verifiers.unit_tests import UnitTestVerifier

    with pytest.raises(ValueError, match=f"isolation={isolation!r}"):
        resolve_isolation(isolation)
    with pytest.raises(ValueError, match=f"isolation={isolation!r}"):
        UnitTestVerifier(isolation=isolation)
    with pytest.raises(ValueError, match=f"isolation={isolation!r}"):
        CodeOutputVerifier(isolation=isolation)


# ---------------------------------------------------------------------------------------------- make install

MAKE = shutil.which("make")
REPO = Path(__file__).resolve().parents[2]


def _make_sandbox_deps(
    tmp_path: Path, *, uid: int, apt_ok: bool = True, sudo_ok: bool = False, bwrap: bool = False
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`make sandbox-deps` (what `make install` runs) with stub `id`, `apt-get` and `sudo` on PATH
    (nothing is installed for real); returns the run and the commands the stubs saw."""
    stubs, log = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir(parents=True)
    ln = shutil.which("ln")
    assert ln is not None
    scripts = {
        "id": f"echo {uid}",
        # a successful install puts a bwrap on PATH, as apt would
        "apt-get": f'echo "apt-get $*" >> {log}\n'
        + (f'[ "$1" = install ] && {ln} -sf /bin/true {stubs}/bwrap\nexit 0' if apt_ok else "exit 100"),
        "sudo": f'echo "sudo $*" >> {log}\n[ "$1" = -n ] && shift\n'
        + ('[ "$1" = true ] && exit 0\nexec "$@"' if sudo_ok else "exit 1"),
    }
    if bwrap:
        scripts["bwrap"] = "exit 0"
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    env = {"PATH": str(stubs), "HOME": str(tmp_path)}
    assert MAKE is not None
    run = subprocess.run(
        [MAKE, "-s", "--no-print-directory", "-C", str(REPO), "sandbox-deps"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return run, log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_install_installs_bubblewrap_or_says_the_sandbox_will_refuse(tmp_path: Path) -> None:
    present, calls = _make_sandbox_deps(tmp_path / "present", uid=1000, bwrap=True)
    assert (present.returncode, present.stdout + present.stderr, calls) == (0, "", [])

    root, calls = _make_sandbox_deps(tmp_path / "root", uid=0)
    assert root.returncode == 0 and "WARNING" not in root.stderr
    assert calls == ["apt-get update -qq", "apt-get install -y -qq bubblewrap"]

    sudo, calls = _make_sandbox_deps(tmp_path / "sudo", uid=1000, sudo_ok=True)
    assert sudo.returncode == 0 and "WARNING" not in sudo.stderr
    assert [c for c in calls if c.startswith("apt-get")] == [
        "apt-get update -qq",
        "apt-get install -y -qq bubblewrap",
    ]

    no_sudo, _ = _make_sandbox_deps(tmp_path / "no_sudo", uid=1000)
    apt_fails, _ = _make_sandbox_deps(tmp_path / "apt_fails", uid=0, apt_ok=False)
    for failed in (no_sudo, apt_fails):
        assert failed.returncode == 0  # the Python install goes on; the sandbox refuses later
        warning = [line for line in failed.stderr.splitlines() if "WARNING" in line]
        assert len(warning) == 1 and "bubblewrap" in warning[0] and "refuse" in warning[0], failed.stderr
