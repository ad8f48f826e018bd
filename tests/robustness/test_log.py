"""The decision log under hostile conditions, with real processes: a reader that never reads,
bytes that are not UTF-8, escape sequences, huge argv, secrets, a terminal, journald."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import launch, procs
from support.build import Programs

ODD = os.fsdecode(b"\xff\xfe")  # a directory name that is not UTF-8
LINE_MAX = 16 * 1024  # docs/configuration.md: no line of the log is longer
# Not journald's stream: vgpu-launch would log to the journal instead of stderr.
NO_JOURNAL: dict[str, str | None] = {"JOURNAL_STREAM": None}


def env(**updates: str) -> dict[str, str]:
    """The tests' environment (support.launch.clean_env), not connected to the journal."""
    return launch.clean_env(NO_JOURNAL, **updates)


def json_events(data: bytes) -> list[dict[str, Any]]:
    """Every line that starts like a JSON object must parse and fit the cap."""
    events = []
    for line in data.splitlines():
        assert len(line) + 1 <= LINE_MAX, f"a line of {len(line)} bytes"
        if line.startswith(b"{"):
            events.append(json.loads(line))
    return events


@dataclass
class Raw:
    """A finished vgpu-launch with its output as bytes: how the log escapes bytes is what these
    tests look at, which text decoded with replacement characters would hide."""

    returncode: int
    stdout: bytes
    stderr: bytes


def run(args: Sequence[Any], tmp: Path, *, env: Mapping[str, str | None] | None = None) -> Raw:
    """``vgpu-launch ARGS`` (no --log-format added) to the end, inside ``rtool reap``
    (support.launch.Tree: nothing of it may be left behind); its stderr goes to a file in
    ``tmp``."""
    err = tmp / f"stderr-{time.monotonic_ns()}"
    with launch.Tree(
        [str(a) for a in args], env={**NO_JOURNAL, **(env or {})}, stderr_path=err, log_format=None
    ) as tree:
        res = tree.wait(120)
        return Raw(res.returncode, tree.out.data, err.read_bytes())


# -- a reader that never reads ----------------------------------------------------------------


def test_a_stalled_stderr_reader_costs_log_lines_not_processes(
    programs: Programs, tmp_path: Path
) -> None:
    """stderr on a FIFO nobody reads: 2000 env -i runs still finish; the loss is counted."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read until the loop is done
    wfd = os.open(fifo, os.O_WRONLY)
    script = (
        "i=0; while [ $i -lt 2000 ]; do env -i /bin/true; i=$((i+1)); done; echo looped; read x"
    )
    # A direct child: support.launch.Tree takes stderr to a file, and this one is a FIFO.
    proc = subprocess.Popen(
        launch.launcher_argv(["--preload", programs.libquiet, "--", "sh", "-c", script]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=wfd,
        env=env(),
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
        left = procs.kill_session(proc.pid)
        proc.wait()
        os.close(rfd)
    assert not left, f"processes left behind: {left}"
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
    programs: Programs, tmp_path: Path, fmt: str, strict: bool
) -> None:
    """A non-UTF-8 program path is logged escaped; later programs are injected, even strict."""
    odd = tmp_path / ODD
    odd.mkdir()
    shutil.copy(programs.probe, odd / "probe")
    logf = tmp_path / "log.jsonl"
    res = run(
        [
            "--log-format",
            fmt,
            "--log-file",
            logf,
            "--preload",
            programs.libmarker,
            *(["--strict"] if strict else []),
            "--",
            "sh",
            "-c",
            'env -i "$1"; env -i "$2"',
            "sh",
            odd / "probe",
            programs.probe,
        ],
        tmp_path,
    )
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


def test_odd_bytes_at_start_are_logged_not_fatal(programs: Programs, tmp_path: Path) -> None:
    """A CMD path and an --env value that are not UTF-8: CMD runs, the start event says so."""
    odd = tmp_path / ODD
    odd.mkdir()
    shutil.copy(programs.probe, odd / "probe")
    logf = tmp_path / "log.jsonl"
    res = run(
        [
            "--log-file",
            logf,
            "--preload",
            programs.libmarker,
            "--env",
            os.fsdecode(b"X=\xff"),
            "--",
            odd / "probe",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.endswith(b"marker=1\n")
    start = json_events(logf.read_bytes())[0]
    assert start["event"] == "start"
    assert start["cmd"] == [f"{tmp_path}/\\xff\\xfe/probe"] and start["env"] == ["X"]


# ('=' would make env(1) read the program's path as an assignment; LD_* variables would make
# ld.so itself write to the tree's stderr, which is the program's output, not vgpu-launch's;
# "--" keeps env(1) from reading a variable whose name starts with "-" as an option, and
# writing its complaint there)
_NAME_BYTES = st.binary(min_size=1, max_size=24).filter(
    lambda b: not {ord("/"), 0, ord("=")} & set(b) and b not in (b".", b"..")
)
_ARG_BYTES = st.binary(max_size=300).filter(lambda b: b"\0" not in b)
_ENV_BYTES = st.tuples(
    st.binary(min_size=1, max_size=16).filter(
        lambda b: b"=" not in b and b"\0" not in b and not b.startswith(b"LD_")
    ),
    _ARG_BYTES,
)


@pytest.mark.parametrize("fmt", ["json", "console"])
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=_NAME_BYTES,
    args=st.lists(_ARG_BYTES, max_size=4),
    environ=st.lists(_ENV_BYTES, max_size=4),
)
# found by the generator once: DEL in an otherwise ASCII line; a variable named "-"
@example(name=b"\x01", args=[], environ=[(b"\x01", b"\x7f")])
@example(name=b"x", args=[], environ=[(b"-", b"")])
def test_a_hostile_tree_cannot_break_the_log(
    programs: Programs,
    tmp_path_factory: pytest.TempPathFactory,
    fmt: str,
    name: bytes,
    args: list[bytes],
    environ: list[tuple[bytes, bytes]],
) -> None:
    """Random bytes in a program's path, argv, env: tracer lives, JSON parses, lines capped."""
    d = tmp_path_factory.mktemp("hostile")
    odd = os.path.join(os.fsencode(d), name)
    os.mkdir(odd)
    prog = os.path.join(odd, b"probe")
    shutil.copy(os.fsencode(programs.probe), prog)
    logf = d / "log.jsonl"
    # The bytes travel as str (os.fsdecode), which subprocess encodes back to the same bytes.
    argv = [
        b"--log-format",
        fmt.encode(),
        b"--log-file",
        os.fsencode(logf),
        b"--preload",
        os.fsencode(programs.libsilent_marker),
        b"--",
        b"sh",
        b"-c",
        b'env -i -- "$@"; env -i ' + os.fsencode(programs.probe),
        b"sh",
        *(k + b"=" + v for k, v in environ),
        prog,
        *args,
    ]
    res = run([os.fsdecode(a) for a in argv], d)
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
    programs: Programs, tmp_path: Path
) -> None:
    """A program whose path and argv hold terminal escape sequences is shown escaped."""
    odd = tmp_path / "\x1b]0;owned\x07\x1b[2J"
    odd.mkdir()
    shutil.copy(programs.probe, odd / "probe")
    res = run(
        [
            "--log-format",
            "console",
            "--preload",
            programs.libquiet,
            "--",
            "env",
            "-i",
            odd / "probe",
            "\x1b[31m\x9b",
        ],
        tmp_path,
    )
    assert res.returncode == 0
    assert not any(b in res.stderr for b in (b"\x1b", b"\x07", "\x9b".encode())), res.stderr
    assert b"/\\x1b]0;owned\\x07\\x1b[2J/probe" in res.stderr


# -- size ---------------------------------------------------------------------------------------


def test_a_huge_argv_gives_lines_under_the_cap_marked_truncated(
    programs: Programs, tmp_path: Path
) -> None:
    """16 arguments of 100 KB: every line of every sink stays under 16 KiB and says so."""
    logf = tmp_path / "log.jsonl"
    big = ["x" * 100_000] * 16
    res = run(
        [
            "--log-format",
            "json",
            "--log-file",
            logf,
            "--preload",
            programs.libquiet,
            "--",
            "sh",
            "-c",
            'env -i /bin/true "$@"',
            "sh",
            *big,
        ],
        tmp_path,
    )
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


def test_environment_values_never_reach_the_log(programs: Programs, tmp_path: Path) -> None:
    """--env, --force-env, VGPU_LAUNCH_ENV and the file's [env]: names logged, values not."""
    conf = tmp_path / "vgpu-launch.conf"
    conf.write_text('[env]\nFILE_TOKEN = "s3cr3t-file"\n')
    logf = tmp_path / "log.jsonl"
    res = run(
        [
            "--config",
            conf,
            "--log-format",
            "json",
            "--log-file",
            logf,
            "--preload",
            programs.libquiet,
            "--env",
            "API_TOKEN=s3cr3t-cli",
            "--force-env",
            "FORCED=s3cr3t-force",
            "--",
            "/bin/true",
        ],
        tmp_path,
        env={"VGPU_LAUNCH_ENV": "ENV_TOKEN=s3cr3t-env"},
    )
    assert res.returncode == 0, res.stderr
    for data in (res.stderr, logf.read_bytes()):
        assert b"s3cr3t" not in data
        start = json_events(data)[0]
        assert start["env"] == ["API_TOKEN", "ENV_TOKEN", "FILE_TOKEN"]
        assert start["force_env"] == ["FORCED"]


# -- a terminal -----------------------------------------------------------------------------------


def on_a_terminal(args: list[str], typed: bytes = b"") -> tuple[bytes, int]:
    """Run ``vgpu-launch ARGS`` (no --log-format added) on a new pseudo-terminal (no echo, no
    output processing), in a session of its own, as a direct child (a terminal is not a file
    for support.launch.Tree); type ``typed`` and two end-of-files; return everything it printed
    and its wait status.  Nothing of its session may be left behind."""
    argv = launch.launcher_argv(args, log_format=None)
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
    left = procs.kill_session(pid)  # pty.fork made the child a session leader
    assert not left, f"processes left behind: {left}"
    return bytes(out), status


def test_on_a_terminal_cmd_output_is_all_there_is(programs: Programs) -> None:
    """vgpu-launch --preload LIB -- tac on a terminal shows exactly tac's output."""
    out, status = on_a_terminal(["--preload", programs.libquiet, "--", "tac"], b"1\n2\n3\n")
    assert out == b"3\n2\n1\n"
    assert os.waitstatus_to_exitcode(status) == 0


def test_on_a_terminal_v_shows_the_decisions(programs: Programs) -> None:
    """-v shows each decision on the terminal, -vv the debug events too."""
    out, _ = on_a_terminal(["-v", "--preload", programs.libquiet, "--", "env", "-i", "/bin/true"])
    assert b"[info     ] exec" in out and b"decision=injected" in out and b"[debug" not in out
    out, _ = on_a_terminal(["-vv", "--preload", programs.libquiet, "--", "/bin/true"])
    assert b"[debug    ] exit" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to another user)")
def test_on_a_terminal_a_program_without_the_preload_is_summed_up(programs: Programs) -> None:
    """A setuid program runs without the preload: the terminal gets one summary line."""
    out, _ = on_a_terminal(
        [
            "--preload",
            programs.libquiet,
            "--",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "su",
            "--version",
        ]
    )
    lines = out.decode().splitlines()
    assert lines[0].startswith("su from util-linux")
    assert lines[1:] == [
        "vgpu-launch: 1 program without the preload (1 setuid); -v shows each decision"
    ]


def test_v_and_log_level_together_are_refused(programs: Programs, tmp_path: Path) -> None:
    """-v is --log-level info: both on one command line is a usage error, in one line."""
    res = run(
        ["-v", "--log-level", "debug", "--preload", programs.libquiet, "--", "true"], tmp_path
    )
    assert res.returncode == 2
    assert res.stderr == (
        b"vgpu-launch: give -v or --log-level, not both (see vgpu-launch --help)\n"
    )


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
    environ = env()  # PYTHONPATH names this checkout
    out = subprocess.run(
        [environ["VGPU_LAUNCH_PYTHON"], "-c", code],
        capture_output=True,
        text=True,
        env=environ,
        check=True,
    )
    assert out.stdout.strip() == "[]"
