"""Running vgpu-launch as users do, through ``bin/vgpu-launch``, and reading what it logged.

- ``run(args)``: runs ``vgpu-launch --log-format json ARGS`` to the end inside ``rtool reap`` (a
  child subreaper, so that nothing is ever left to a PID 1 that does not reap) in a session of
  its own, with a time limit; afterwards it checks that no process of that session is left
  (killing, by pid, and reporting any that is).  Returns a ``LaunchResult``.
- ``Tree(args)``: the same in the background, for tests that act on the tree while it runs
  (freeze the tracer, kill it); ``tree.wait()`` gives the ``LaunchResult``.
- ``started(argv, tmp_path)``: any command line (``launch_argv(...)``, or a shell around it) as a
  direct child of the test, in a session or process group of its own, so that the test sees
  its wait status as a shell or systemd would (stops included).
- ``ShellTree(options)``: a ``Tree`` whose CMD is a shell that runs the lines the test
  ``send``s it (processes started, then acted on: released, debugged, killed).
- ``command(args)``: a command that starts no tree (``release``, ``status``) to the end.
- ``clean_env(updates)``: the environment every one of them starts from.

``user="nobody"`` runs vgpu-launch as nobody, from a copy of bin/ and vgpu_launch/ that nobody
can read, with Debian's /usr/bin/python3.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from support import REPO, build, procs

LAUNCHER = REPO / "bin" / "vgpu-launch"
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike an interpreter under /root
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]

Arg = str | os.PathLike[str]
S = TypeVar("S", bound="Started")


def clean_env(
    updates: Mapping[str, str | None] | None = None, /, **more: str | None
) -> dict[str, str]:
    """This environment without LD_PRELOAD, VGPU_TEST_*, PYTEST_* and vgpu-launch's settings
    (VGPU_LAUNCH_*, which it would refuse or obey), updated (a value of None removes).

    VGPU_LAUNCH_PYTHON, the interpreter bin/vgpu-launch runs, is kept, or set to the one running
    the tests (it has the packages). PYTHONPATH names the checkout, for ``python -m
    vgpu_launch`` (bin/vgpu-launch itself runs Python with -E)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "LD_PRELOAD" and not k.startswith(("VGPU_TEST_", "PYTEST_", "VGPU_LAUNCH_"))
    }
    env["VGPU_LAUNCH_PYTHON"] = os.environ.get("VGPU_LAUNCH_PYTHON", sys.executable)
    env["PYTHONPATH"] = str(REPO)
    for k, v in [*(updates or {}).items(), *more.items()]:
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@functools.cache
def public_launcher() -> Path:
    """A copy of bin/ and vgpu_launch/ that ``nobody`` can run: the checkout itself may sit
    in a directory only root can enter."""
    root = build.public_dir("vgpu-launch-tests-launcher-")
    atexit.register(shutil.rmtree, root, True)
    shutil.copytree(REPO / "bin", root / "bin")
    shutil.copytree(
        REPO / "vgpu_launch", root / "vgpu_launch", ignore=shutil.ignore_patterns("__pycache__")
    )
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() or path.parent.name == "bin" else 0o644)
    return root / "bin" / "vgpu-launch"


def launcher_argv(
    args: Sequence[Arg],
    *,
    user: str | None = None,
    log_format: str | None = "json",
    module: bool = False,
    wrap: Sequence[str] = (),
) -> list[str]:
    """``vgpu-launch [--log-format FORMAT] ARGS``: through bin/vgpu-launch (a copy that nobody
    can read, with ``user``), or with ``module`` as ``python -m vgpu_launch``. ``wrap``: a
    command that runs vgpu-launch (``capsh --drop=... -- -c 'exec "$0" "$@"'``)."""
    words = [os.fspath(a) for a in args]
    options = words[: words.index("--")] if "--" in words else words
    fmt: list[str] = []
    if log_format and not any(
        a == "--log-format" or a.startswith("--log-format=") for a in options
    ):
        fmt = ["--log-format", log_format]
    if module:
        head = [os.environ.get("VGPU_LAUNCH_PYTHON", sys.executable), "-m", "vgpu_launch"]
    elif user == "nobody":
        head = [*NOBODY, str(public_launcher())]
    else:
        head = [str(LAUNCHER)]
    return [*wrap, *head, *fmt, *words]


def launch_argv(
    lib: Arg, *cmd: Arg, options: Sequence[str] = (), module: bool = False
) -> list[str]:
    """``vgpu-launch --log-format json --preload LIB [OPTIONS] -- CMD...``."""
    return launcher_argv(["--preload", lib, *options, "--", *cmd], module=module)


# ---- what vgpu-launch said --------------------------------------------------------------------

PROBE_RE = re.compile(
    r"^probe pid=(?P<pid>\d+) LD_PRELOAD=(?P<preload>.*) VGPU_TEST_DEVICES=(?P<devices>\S*) "
    r"marker=(?P<marker>[01])$"
)


def parse_probes(stdout: str) -> list[dict[str, Any]]:
    """The lines of tests/programs/probe.c in some output, as dicts (pid, preload, devices,
    marker)."""
    found = []
    for line in stdout.splitlines():
        m = PROBE_RE.match(line)
        if m:
            found.append(
                {
                    "pid": int(m["pid"]),
                    "preload": m["preload"],
                    "devices": m["devices"],
                    "marker": int(m["marker"]),
                }
            )
    return found


def preload_entries(value: str) -> list[str]:
    """LD_PRELOAD's entries (ld.so accepts ':' and spaces as separators)."""
    return [e for e in re.split(r"[: ]+", value) if e]


def reap_status(stdout: str) -> int:
    """The status ``rtool reap`` (as CMD) printed for its child (negative: killed by that
    signal)."""
    m = re.search(r"^reap status=(-?\d+)$", stdout, re.M)
    assert m, stdout
    return int(m.group(1))


def _same_file(a: Any, b: Arg) -> bool:
    if not a:
        return False
    try:
        return os.path.realpath(str(a)) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


@dataclass
class LaunchResult:
    """A finished vgpu-launch: its status, its output, and its log split into events."""

    argv: list[str]
    returncode: int  # vgpu-launch's exit code, or -N for death by signal N
    stdout: str
    stderr: str
    events: list[dict[str, Any]] = field(default_factory=list)  # the JSON lines of stderr
    lines: list[str] = field(default_factory=list)  # the other lines (the programs' own)

    def __post_init__(self) -> None:
        for line in self.stderr.splitlines():
            ev = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
            if isinstance(ev, dict) and "event" in ev:
                self.events.append(ev)
            else:
                self.lines.append(line)

    def of(self, name: str) -> list[dict[str, Any]]:
        """The events called ``name``."""
        return [e for e in self.events if e["event"] == name]

    @property
    def end(self) -> dict[str, Any]:
        """The end event (there must be exactly one)."""
        ends = self.of("end")
        assert len(ends) == 1, self.describe()
        return ends[0]

    def execs(self, exe_suffix: str = "") -> list[dict[str, Any]]:
        """exec events of programs whose path ends with ``exe_suffix``."""
        return [e for e in self.of("exec") if str(e.get("exe", "")).endswith(exe_suffix)]

    def exec_events(
        self, exe: Arg | None = None, pid: int | None = None, decision: str | None = None
    ) -> list[dict[str, Any]]:
        """exec events, optionally only those of program ``exe`` / process ``pid`` / decision.

        A program matches by the event's ``exe`` or, failing that, its ``argv[0]`` (both compared
        after resolving symlinks)."""
        found = []
        for ev in self.of("exec"):
            if pid is not None and ev.get("pid") != pid:
                continue
            if decision is not None and ev.get("decision") != decision:
                continue
            if exe is not None:
                argv0 = (ev.get("argv") or [None])[0]
                if not (_same_file(ev.get("exe"), exe) or _same_file(argv0, exe)):
                    continue
            found.append(ev)
        return found

    @property
    def probes(self) -> list[dict[str, Any]]:
        """The lines of tests/programs/probe.c on stdout."""
        return parse_probes(self.stdout)

    def describe(self, tail: int = 60) -> str:
        """For assertion messages: the command, status, and the ends of its output."""
        out = "\n".join(self.stdout.splitlines()[-tail:])
        err = "\n".join(line[:1500] for line in self.stderr.splitlines()[-tail:])
        return (
            f"\n$ {' '.join(self.argv)}\nexit status {self.returncode}\n"
            f"--- stdout (last {tail} lines)\n{out}\n--- stderr (last {tail} lines)\n{err}"
        )


# ---- a command in the background --------------------------------------------------------------


class Lines:
    """Lines of a pipe, read without blocking past a deadline; everything read is kept in
    ``data``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = b""
        self.buf = b""
        self.lines: list[str] = []
        self.seen: list[str] = []  # lines passed over by expect()
        self.eof = False

    def _fill(self, timeout: float) -> None:
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            return
        self.data += chunk
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        self.lines.extend(d.decode(errors="replace") for d in done)

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for a line (from the first unread one on) matching ``pattern``; return the
        match. Lines before it stay read."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            while self.lines:
                line = self.lines.pop(0)
                m = rx.search(line)
                if m:
                    return m
                self.seen.append(line)
            if self.eof or time.monotonic() > deadline:
                pytest.fail(
                    f"no line matching {pattern!r} within {timeout} s; read: {self.seen[-20:]!r}"
                )
            self._fill(deadline - time.monotonic())

    def read_to_end(self, timeout: float = 20.0) -> bool:
        """Read until the end of the stream; whether it ended within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._fill(deadline - time.monotonic())
        return self.eof

    def rest(self, timeout: float = 20.0) -> list[str]:
        """Every line not yet read, up to the end of the stream."""
        if not self.read_to_end(timeout):
            pytest.fail(f"the stream did not end within {timeout} s")
        out, self.lines = self.lines, []
        if self.buf:
            out.append(self.buf.decode(errors="replace"))
            self.buf = b""
        return out

    def poll_lines(self, duration: float) -> list[str]:
        """What arrives within ``duration`` seconds (for checking that nothing more comes)."""
        deadline = time.monotonic() + duration
        while not self.eof and time.monotonic() < deadline:
            self._fill(deadline - time.monotonic())
        out, self.lines = self.lines, []
        return out


def _decode_status(raw: int) -> int:
    if os.WIFEXITED(raw):
        return os.WEXITSTATUS(raw)
    if os.WIFSIGNALED(raw):
        return -os.WTERMSIG(raw)
    return 1000 + raw


class Started:
    """A command started in the background: ``proc`` (stdin and stdout pipes unless told
    otherwise), ``out`` (its stdout, by lines), ``stderr()`` (what it wrote to its stderr, a
    file).  ``close()`` kills its process group and its children."""

    def __init__(
        self,
        argv: Sequence[Arg],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Arg | None = None,
        new_session: bool = True,
        stdin: Any = subprocess.PIPE,
        stderr_path: Arg | None = None,
        **popen: Any,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        # Closed in close(): the process outlives this constructor.
        self._err: IO[bytes] = (
            open(stderr_path, "w+b")  # noqa: SIM115
            if stderr_path is not None
            else tempfile.TemporaryFile(prefix="vgpu-launch-tests-stderr-")  # noqa: SIM115
        )
        group: dict[str, Any] = {"start_new_session": True} if new_session else {"process_group": 0}
        self.proc = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=dict(env or clean_env()),
            cwd=cwd,
            **group,
            **popen,
        )
        assert self.proc.stdout is not None
        self.out = Lines(self.proc.stdout.fileno())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self._err.flush()
        with open(self._err.fileno(), "rb", closefd=False) as f:
            f.seek(0)
            return f.read().decode(errors="replace")

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait_status(self, timeout: float = 30.0) -> int:
        """The raw wait status, as a parent (a shell, systemd) sees it."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = _decode_status(status)
                return status
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.argv[0]} did not exit within {timeout} s; stderr:\n"
                    f"{self.stderr()[-3000:]}"
                )
            time.sleep(0.005)

    def _kill(self) -> None:
        leftovers = procs.children(self.proc.pid)
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in (self.proc.pid, *leftovers):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self._kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
        self._err.close()

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def started(
    argv: Sequence[Arg],
    tmp_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    new_session: bool = True,
    cwd: Arg | None = None,
    **popen: Any,
) -> Iterator[Started]:
    """Start ``argv`` (stdin and stdout pipes, stderr to a file in ``tmp_path``) in a session of
    its own (or, ``new_session`` false, a process group of its own in this session: not
    orphaned, so that stop signals act); kill its process group and its children at the end."""
    err = tmp_path / f"stderr-{time.monotonic_ns()}"
    with Started(argv, env=env, cwd=cwd, new_session=new_session, stderr_path=err, **popen) as run:
        yield run


class Tree(Started):
    """vgpu-launch running in the background inside ``rtool reap``, in a session of its own;
    ``wait()`` checks that nothing of the session is left behind."""

    def __init__(
        self,
        args: Sequence[Arg],
        *,
        env: Mapping[str, str | None] | None = None,
        user: str | None = None,
        stdin: Any = subprocess.DEVNULL,
        stderr_path: Arg | None = None,
        log_format: str | None = "json",
        cwd: Arg | None = None,
        pass_fds: Sequence[int] = (),
        wrap: Sequence[str] = (),
    ) -> None:
        updates: dict[str, str | None] = {"VGPU_LAUNCH_PYTHON": SYSTEM_PYTHON} if user else {}
        updates.update(env or {})
        # Closed in close(): the tree outlives this constructor.
        self.status_file = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="vgpu-launch-tests-status-"
        )
        self.launch_argv = launcher_argv(args, user=user, log_format=log_format, wrap=wrap)
        super().__init__(
            [build_rtool(), "reap", "-s", self.status_file.name, *self.launch_argv],
            env=clean_env(updates),
            cwd=cwd,
            stdin=stdin,
            stderr_path=stderr_path,
            pass_fds=tuple(pass_fds),
        )
        self.sid = self.proc.pid
        self._launcher = 0

    @property
    def launcher(self) -> int:
        """vgpu-launch's pid (``setpriv`` and ``bin/vgpu-launch`` exec, so it is reap's child)."""
        if not self._launcher:
            self._launcher = procs.wait_for(
                "vgpu-launch to start", lambda: (procs.children(self.sid) or [0])[0], 10
            )
            # bin/vgpu-launch is a shell script that execs python: wait for the exec.
            procs.wait_for(
                "vgpu-launch's interpreter",
                lambda: (
                    "python" in Path(f"/proc/{self._launcher}/comm").read_text()
                    or len(os.listdir(f"/proc/{self._launcher}/task")) > 1
                ),
                10,
            )
        return self._launcher

    def tracer_ready(self, timeout: float = 10) -> None:
        """Wait until the tracer thread exists (vgpu-launch has two threads)."""
        procs.wait_for(
            "tracer thread", lambda: len(os.listdir(f"/proc/{self.launcher}/task")) >= 2, timeout
        )

    def freeze(self) -> None:
        """Stop vgpu-launch (tracer thread included): tracees that reach a ptrace stop stay
        there, unseen, until ``thaw``."""
        os.kill(self.launcher, signal.SIGSTOP)
        procs.wait_for(
            "vgpu-launch to stop",
            lambda: all(
                procs.state(f"{self.launcher}/task/{t}") in ("T", "t", None)
                for t in os.listdir(f"/proc/{self.launcher}/task")
            ),
            10,
        )

    def thaw(self) -> None:
        os.kill(self.launcher, signal.SIGCONT)

    def pids(self) -> list[int]:
        return procs.session_pids(self.sid)

    def tree_pids(self) -> list[int]:
        """The processes of CMD's tree: the session without reap and vgpu-launch."""
        return [p for p in self.pids() if p not in (self.sid, self.launcher)]

    def log(self) -> LaunchResult:
        """What vgpu-launch has logged so far, while it runs (its exit status: -1, not yet
        known)."""
        return self._result(-1)

    def wait_event(self, name: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        """Wait until vgpu-launch logs an event ``name`` with these ``fields``; return it."""

        def found() -> dict[str, Any] | None:
            return next(
                (e for e in self.log().of(name) if all(e.get(k) == v for k, v in fields.items())),
                None,
            )

        return procs.wait_for(
            f"a {name} event with {fields}", found, timeout, describe=lambda: self.log().describe()
        )

    def wait(self, timeout: float = 60) -> LaunchResult:
        """Wait for the end of vgpu-launch's output and of reap; vgpu-launch's status and
        output.  Fails if anything of the session is left."""
        self.close_stdin()
        ended = self.out.read_to_end(timeout)
        try:
            self.proc.wait(timeout=max(1.0, timeout) if ended else 0.1)
        except subprocess.TimeoutExpired:
            ended = False
        if not ended:
            left = procs.kill_session(self.sid)
            raise AssertionError(
                f"vgpu-launch did not finish within {timeout} s; killed {left}\n"
                + self._result(-1).describe()
            )
        raw = Path(self.status_file.name).read_text().strip()
        left = procs.kill_session(self.sid)
        result = self._result(_decode_status(int(raw)) if raw else -1000)
        assert not left, f"processes left behind: {left}\n{result.describe()}"
        return result

    def _result(self, returncode: int) -> LaunchResult:
        return LaunchResult(
            self.launch_argv, returncode, self.out.data.decode(errors="replace"), self.stderr()
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            procs.kill_session(self.sid)
        super().close()
        self.status_file.close()


# CMD of a ShellTree: runs each line read from the FIFO "$0" as a shell command, until "exit".
# It holds the FIFO open for reading and writing, so that no line is lost between two writers
# and a writer that closes never looks like the end.
SHELL_LOOP = ["/bin/sh", "-c", 'exec 3<>"$0"; while read -r line <&3; do eval "$line" 3<&-; done']


class ShellTree(Tree):
    """``vgpu-launch OPTIONS -- sh`` in the background (a ``Tree``), whose CMD, a shell, runs
    each line that ``send`` gives it (one after the other: end a line with ``&`` to go on at
    once) until ``exit``.  ``dir`` is a fresh directory that CMD may write to, as ``nobody``
    too, for what those commands leave."""

    def __init__(
        self,
        options: Sequence[Arg],
        *,
        user: str | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> None:
        self.dir = build.public_dir("vgpu-launch-tests-shell-")
        self.dir.chmod(0o777)
        self.ctl = self.dir / "ctl"
        os.mkfifo(self.ctl)
        self.ctl.chmod(0o666)  # past the umask
        try:
            super().__init__([*options, "--", *SHELL_LOOP, self.ctl], user=user, env=env)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def send(self, line: str) -> None:
        """Give CMD's shell one command line (once it reads them)."""

        def opened() -> int | None:
            try:
                return os.open(self.ctl, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader, yet or any more
                if self.proc.poll() is not None:
                    raise AssertionError(f"vgpu-launch has ended{self.log().describe()}") from None
                return None

        fd = procs.wait_for("CMD's shell to read commands", opened, 30)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run(
    args: Sequence[Arg],
    *,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 120,
    user: str | None = None,
    input: bytes | None = None,
    log_format: str | None = "json",
    cwd: Arg | None = None,
    pass_fds: Sequence[int] = (),
    wrap: Sequence[str] = (),
) -> LaunchResult:
    """Run ``vgpu-launch [--log-format json] ARGS`` to the end; check that nothing of its
    session is left behind.  ``env`` updates ``clean_env()``."""
    with Tree(
        args,
        env=env,
        user=user,
        log_format=log_format,
        cwd=cwd,
        pass_fds=pass_fds,
        wrap=wrap,
        stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
    ) as tree:
        if input is not None:
            assert tree.proc.stdin is not None
            tree.proc.stdin.write(input)
        return tree.wait(timeout)


def command(
    args: Sequence[Arg],
    *,
    user: str | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 120,
) -> LaunchResult:
    """``vgpu-launch ARGS`` to the end, as a direct child of the test, for a command that
    starts no tree (``release``, ``status``): its status and output, no ``--log-format``
    added.  ``env`` updates ``clean_env()``."""
    updates: dict[str, str | None] = {"VGPU_LAUNCH_PYTHON": SYSTEM_PYTHON} if user else {}
    updates.update(env or {})
    argv = launcher_argv(args, user=user, log_format=None)
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=clean_env(updates), timeout=timeout, check=False
    )
    return LaunchResult(argv, proc.returncode, proc.stdout, proc.stderr)


@functools.cache
def test_hooks_fd() -> int:
    """The memfd that makes vgpu-launch honour VGPU_LAUNCH_TEST_FAULT (vgpu_launch/testhooks.py):
    pass it with ``pass_fds``."""
    return os.memfd_create("vgpu-launch-test-hooks", 0)


@functools.cache
def build_rtool() -> str:
    """tests/programs/rtool (for ``rtool reap``), built once."""
    return build.build_programs().rtool
