"""The decision log under hostile conditions, with real processes: a reader that never reads,
bytes that are not UTF-8, escape sequences, huge argv, secrets, a terminal, journald."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from conftest import Artefacts

from support import REPO

ODD = os.fsdecode(b"\xff\xfe")  # a directory name that is not UTF-8
LINE_MAX = 16 * 1024  # docs/configuration.md: no line of the log is longer


def env(**updates: str) -> dict[str, str]:
    """This environment without LD_PRELOAD and vgpu-launch settings (but the interpreter)."""
    out = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and k != "JOURNAL_STREAM"
           and not (k.startswith("VGPU_LAUNCH_") and k != "VGPU_LAUNCH_PYTHON")}
    return out | updates


@pytest.fixture(scope="module")
def quiet_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preload library that prints nothing (libmarker.so writes to stderr when loaded)."""
    d = tmp_path_factory.mktemp("quiet-lib")
    (d / "q.c").write_text("int vgpu_launch_quiet_lib = 1;\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "libquiet.so"), str(d / "q.c")],
                   check=True, capture_output=True, timeout=120)
    return d / "libquiet.so"


@pytest.fixture(scope="module")
def silent_marker(quiet_lib: Path) -> Path:
    """A library named libmarker.so (what probe looks for in its maps) that prints nothing."""
    d = quiet_lib.parent / "silent"
    d.mkdir(exist_ok=True)
    shutil.copy(quiet_lib, d / "libmarker.so")
    return d / "libmarker.so"


def json_events(data: bytes) -> list[dict[str, Any]]:
    """Every line that starts like a JSON object must parse and fit the cap."""
    events = []
    for line in data.splitlines():
        assert len(line) + 1 <= LINE_MAX, f"a line of {len(line)} bytes"
        if line.startswith(b"{"):
            events.append(json.loads(line))
    return events


def run(vgpu_launch: list[str], args: list[Any], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*vgpu_launch, *map(str, args)], capture_output=True, env=env(),
                          stdin=subprocess.DEVNULL, timeout=120, check=False, **kw)


# -- a reader that never reads ----------------------------------------------------------------


def test_a_stalled_stderr_reader_costs_log_lines_not_processes(
    vgpu_launch: list[str], quiet_lib: Path, tmp_path: Path
) -> None:
    """stderr on a FIFO nobody reads: 2000 env -i runs still finish; the loss is counted."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read until the loop is done
    wfd = os.open(fifo, os.O_WRONLY)
    script = ("i=0; while [ $i -lt 2000 ]; do env -i /bin/true; i=$((i+1)); done; "
              "echo looped; read x")
    proc = subprocess.Popen(
        [*vgpu_launch, "--log-format", "json", "--preload", str(quiet_lib), "--",
         "sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=wfd, env=env(),
        start_new_session=True,
    )
    os.close(wfd)
    drained = bytearray()
    try:
        assert proc.stdout is not None and proc.stdin is not None
        # Before the fix the tracer blocked in write() and the loop never got here.
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready and proc.stdout.readline() == b"looped\n", "the loop did not finish"

        def drain() -> None:
            os.set_blocking(rfd, True)
            while chunk := os.read(rfd, 1 << 16):
                drained.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        proc.stdin.write(b"\n")
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
        reader.join(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(rfd)
    events = json_events(bytes(drained))
    lost = [e for e in events if e["event"] == "log-dropped"]
    assert lost and all(e["dropped"] > 0 and e["sink"] == "stderr" for e in lost)
    end = events[-1]
    assert end["event"] == "end" and end["cmd_exit"] == 0
    assert end["log_dropped"] == sum(e["dropped"] for e in lost)
    assert end["counts"]["injected"] == 2000


# -- bytes that are not UTF-8 -------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "strict"), [("json", True), ("console", False)])
def test_a_program_path_that_is_not_utf8_does_not_stop_injection(
    vgpu_launch: list[str], programs: Artefacts, tmp_path: Path, fmt: str, strict: bool
) -> None:
    """A program exec'd from a non-UTF-8 path is logged escaped; the next one still gets the
    preload, and nothing is killed (strict mode included)."""
    odd = tmp_path / ODD
    odd.mkdir()
    shutil.copy(programs.probe, odd / "probe")
    logf = tmp_path / "log.jsonl"
    res = run(vgpu_launch, [
        "--log-format", fmt, "--log-file", logf, "--preload", programs.libmarker,
        *(["--strict"] if strict else []), "--",
        "sh", "-c", 'env -i "$1"; env -i "$2"', "sh", odd / "probe", programs.probe,
    ])
    assert res.returncode == 0, res.stderr[-2000:]
    markers = [line.rsplit(b"marker=", 1)[1] for line in res.stdout.splitlines()]
    assert markers == [b"1", b"1"], res.stdout
    events = json_events(logf.read_bytes())
    assert "tracer-failed" not in [e["event"] for e in events]
    escaped = f"{tmp_path}/\\xff\\xfe/probe"
    assert [e["exe"] for e in events if e["event"] == "exec" and "xff" in e["exe"]] == [escaped]
    if fmt == "json":
        assert json_events(res.stderr) == events
    else:
        assert f"exe={escaped}".encode() in res.stderr


def test_odd_bytes_at_start_are_logged_not_fatal(
    vgpu_launch: list[str], programs: Artefacts, tmp_path: Path
) -> None:
    """A CMD path and an --env value that are not UTF-8: CMD runs, the start event says so."""
    odd = tmp_path / ODD
    odd.mkdir()
    shutil.copy(programs.probe, odd / "probe")
    logf = tmp_path / "log.jsonl"
    res = run(vgpu_launch, ["--log-file", logf, "--preload", programs.libmarker,
                            "--env", os.fsdecode(b"X=\xff"), "--", odd / "probe"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.endswith(b"marker=1\n")
    start = json_events(logf.read_bytes())[0]
    assert start["event"] == "start"
    assert start["cmd"] == [f"{tmp_path}/\\xff\\xfe/probe"] and start["env"] == ["X"]


# ('=' would make env(1) read the program's path as an assignment)
_NAME_BYTES = st.binary(min_size=1, max_size=24).filter(
    lambda b: not {ord("/"), 0, ord("=")} & set(b) and b not in (b".", b".."))
_ARG_BYTES = st.binary(max_size=300).filter(lambda b: b"\0" not in b)
_ENV_BYTES = st.tuples(
    st.binary(min_size=1, max_size=16).filter(lambda b: b"=" not in b and b"\0" not in b),
    _ARG_BYTES,
)


@pytest.mark.parametrize("fmt", ["json", "console"])
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=_NAME_BYTES, args=st.lists(_ARG_BYTES, max_size=4),
       environ=st.lists(_ENV_BYTES, max_size=4))
def test_a_hostile_tree_cannot_break_the_log(
    vgpu_launch: list[str], programs: Artefacts, silent_marker: Path,
    tmp_path_factory: pytest.TempPathFactory,
    fmt: str, name: bytes, args: list[bytes], environ: list[tuple[bytes, bytes]],
) -> None:
    """A program exec'd with random bytes in its path, argv and environment, under each format
    with --log-file: the tracer lives on, a later env -i child is injected, every JSON line
    parses and no line is over the cap."""
    d = tmp_path_factory.mktemp("hostile")
    odd = os.path.join(os.fsencode(d), name)
    os.mkdir(odd)
    prog = os.path.join(odd, b"probe")
    shutil.copy(programs.probe, prog)
    logf = d / "log.jsonl"
    argv = [*map(os.fsencode, vgpu_launch), b"--log-format", fmt.encode(),
            b"--log-file", os.fsencode(logf), b"--preload", os.fsencode(silent_marker),
            b"--", b"sh", b"-c", b'env -i "$@"; env -i ' + os.fsencode(programs.probe), b"sh",
            *(k + b"=" + v for k, v in environ), prog, *args]
    res = subprocess.run(argv, capture_output=True, env=env(), stdin=subprocess.DEVNULL,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[-1].endswith(b"marker=1"), res.stdout
    events = json_events(logf.read_bytes())
    names = [e["event"] for e in events]
    assert "tracer-failed" not in names and names[-1] == "end"
    assert events[-1]["counts"]["failed"] == 0 and events[-1]["log_errors"] == 0
    ours = res.stderr.splitlines()
    for line in ours:  # vgpu-launch's own lines: valid UTF-8, no control byte, capped
        assert len(line) + 1 <= LINE_MAX
        text = line.decode()
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text), line
    if fmt == "json":
        assert [json.loads(line)["event"] for line in ours] == names


# -- escape sequences ---------------------------------------------------------------------------


def test_the_console_writes_no_control_bytes_from_programs(
    vgpu_launch: list[str], quiet_lib: Path, programs: Artefacts, tmp_path: Path
) -> None:
    """A program whose path and argv hold terminal escape sequences is shown escaped."""
    odd = tmp_path / "\x1b]0;owned\x07\x1b[2J"
    odd.mkdir()
    shutil.copy(programs.probe, odd / "probe")
    res = run(vgpu_launch, ["--log-format", "console", "--preload", quiet_lib, "--",
                            "env", "-i", odd / "probe", "\x1b[31m\x9b"])
    assert res.returncode == 0
    assert not any(b in res.stderr for b in (b"\x1b", b"\x07", "\x9b".encode())), res.stderr
    assert b"/\\x1b]0;owned\\x07\\x1b[2J/probe" in res.stderr


# -- size ---------------------------------------------------------------------------------------


def test_a_huge_argv_gives_lines_under_the_cap_marked_truncated(
    vgpu_launch: list[str], quiet_lib: Path, tmp_path: Path
) -> None:
    """16 arguments of 100 KB: every line of every sink stays under 16 KiB and says so."""
    logf = tmp_path / "log.jsonl"
    big = ["x" * 100_000] * 16
    res = run(vgpu_launch, ["--log-format", "json", "--log-file", logf,
                            "--preload", quiet_lib, "--",
                            "sh", "-c", 'env -i /bin/true "$@"', "sh", *big])
    assert res.returncode == 0
    for data in (res.stderr, logf.read_bytes()):
        events = json_events(data)
        start = events[0]
        assert start["event"] == "start" and start["truncated"] is True
        assert start["cmd"][4].startswith("x" * 200)
        assert start["cmd"][4].endswith("more characters)")
        execs = [e for e in events if e["event"] == "exec"]
        assert execs and all(e["truncated"] is True for e in execs)


# -- secrets --------------------------------------------------------------------------------------


def test_environment_values_never_reach_the_log(
    vgpu_launch: list[str], quiet_lib: Path, tmp_path: Path
) -> None:
    """--env, --force-env, VGPU_LAUNCH_ENV and the file's [env]: names logged, values not."""
    conf = tmp_path / "vgpu-launch.conf"
    conf.write_text('[env]\nFILE_TOKEN = "s3cr3t-file"\n')
    logf = tmp_path / "log.jsonl"
    res = subprocess.run(
        [*vgpu_launch, "--config", str(conf), "--log-format", "json", "--log-file", str(logf),
         "--preload", str(quiet_lib), "--env", "API_TOKEN=s3cr3t-cli",
         "--force-env", "FORCED=s3cr3t-force", "--", "/bin/true"],
        capture_output=True, env=env(VGPU_LAUNCH_ENV="ENV_TOKEN=s3cr3t-env"), timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    for data in (res.stderr, logf.read_bytes()):
        assert b"s3cr3t" not in data
        start = json_events(data)[0]
        assert start["env"] == ["API_TOKEN", "ENV_TOKEN", "FILE_TOKEN"]
        assert start["force_env"] == ["FORCED"]


# -- a terminal -----------------------------------------------------------------------------------


def on_a_terminal(argv: list[str], typed: bytes = b"") -> tuple[bytes, int]:
    """Run ``argv`` on a new pseudo-terminal (no echo, no output processing), type ``typed``
    and two end-of-files; return everything it printed and its wait status."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(argv[0], argv, env())
    attrs = termios.tcgetattr(fd)
    attrs[1] &= ~termios.OPOST
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    os.write(fd, typed + b"\x04\x04")
    out = bytearray()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every process of the terminal closed it
                break
            if not chunk:
                break
            out.extend(chunk)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return bytes(out), status


def test_on_a_terminal_cmd_output_is_all_there_is(
    vgpu_launch: list[str], quiet_lib: Path
) -> None:
    """vgpu-launch --preload LIB -- tac on a terminal shows exactly tac's output."""
    out, status = on_a_terminal([*vgpu_launch, "--preload", str(quiet_lib), "--", "tac"],
                                b"1\n2\n3\n")
    assert out == b"3\n2\n1\n"
    assert os.waitstatus_to_exitcode(status) == 0


def test_on_a_terminal_v_shows_the_decisions(vgpu_launch: list[str], quiet_lib: Path) -> None:
    """-v shows each decision on the terminal, -vv the debug events too."""
    out, _ = on_a_terminal([*vgpu_launch, "-v", "--preload", str(quiet_lib), "--",
                            "env", "-i", "/bin/true"])
    assert b"[info     ] exec" in out and b"decision=injected" in out and b"[debug" not in out
    out, _ = on_a_terminal([*vgpu_launch, "-vv", "--preload", str(quiet_lib), "--",
                            "/bin/true"])
    assert b"[debug    ] exit" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to another user)")
def test_on_a_terminal_a_program_without_the_preload_is_summed_up(
    vgpu_launch: list[str], quiet_lib: Path
) -> None:
    """A setuid program runs without the preload: the terminal gets one summary line."""
    out, _ = on_a_terminal([*vgpu_launch, "--preload", str(quiet_lib), "--",
                            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "su", "--version"])
    lines = out.decode().splitlines()
    assert lines[0].startswith("su from util-linux")
    assert lines[1:] == [
        "vgpu-launch: 1 program without the preload (1 setuid); -v shows each decision"]


def test_v_and_log_level_together_are_refused(vgpu_launch: list[str], quiet_lib: Path) -> None:
    """-v is --log-level info: both on one command line is a usage error, in one line."""
    res = run(vgpu_launch, ["-v", "--log-level", "debug", "--preload", quiet_lib, "--", "true"])
    assert res.returncode == 2
    assert res.stderr == (b"vgpu-launch: give -v or --log-level, not both "
                          b"(see vgpu-launch --help)\n")


# -- start-up -------------------------------------------------------------------------------------


def test_the_way_to_cmd_imports_no_renderer() -> None:
    """Configuring and logging before CMD runs imports neither structlog nor json."""
    code = (
        "import sys\n"
        "import vgpu_launch.cli, vgpu_launch.launcher\n"
        "from vgpu_launch import log\n"
        "log.configure(None, 'info', None)\n"
        "log.get().info('start', cmd=['x'])\n"
        "print(sorted(m for m in ('structlog', 'json') if m in sys.modules))\n"
    )
    python = os.environ.get("VGPU_LAUNCH_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True,
                         env=env(PYTHONPATH=str(REPO)), check=True)
    assert out.stdout.strip() == "[]"
