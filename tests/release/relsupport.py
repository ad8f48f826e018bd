"""Plumbing of the release tests: build their programs, run vgpu-launch in a session of its
own (inside ``rel_reap``, a child subreaper, so that nothing is left to a PID 1 that does not
reap), drive the tree through a FIFO, read its log, and kill whatever is left afterwards.

The programs (tests/programs/rel_*.c, librelmarker.c) are built once per source hash into a
world-readable directory under /tmp: some tests run processes as ``nobody``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "tests" / "programs"
LAUNCHER = REPO / "bin" / "vgpu-launch"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, readable by nobody, with the Debian packages
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]

# name -> (compiler argv, source, flags); None as compiler argv: optional (-m32, ASan)
_PROGRAMS: dict[str, tuple[list[str], str, list[str]]] = {
    "rel_worker": (["gcc"], "rel_worker.c", ["-pthread", "-g", "-O0"]),
    "rel_ptrace": (["gcc"], "rel_ptrace.c", []),
    "rel_ptrace32": (["gcc", "-m32"], "rel_ptrace.c", []),
    "rel_probe": (["gcc"], "rel_probe.c", []),
    "rel_reap": (["gcc"], "rel_reap.c", []),
    "rel_nosec": (["gcc"], "rel_nosec.c", []),
    "rel_leak": (["gcc", "-fsanitize=address", "-g"], "rel_leak.c", []),
    "librelmarker.so": (["gcc"], "librelmarker.c", ["-shared", "-fPIC"]),
}
# What each needs from Debian, for the failure message.
_PACKAGES = {"rel_ptrace32": "gcc-multilib", "rel_leak": "gcc (libasan)"}


class Built(dict[str, str]):
    def __getattr__(self, name: str) -> str:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@functools.cache
def build() -> Built:
    sources = sorted({SRC / src for _, src, _ in _PROGRAMS.values()})
    digest = hashlib.sha256(repr(_PROGRAMS).encode())
    for src in sources:
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    out = Path(tempfile.gettempdir()) / f"vgpu-release-{os.getuid()}-{digest.hexdigest()[:12]}"
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".done").exists():
            tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
            for name, (cc, source, flags) in _PROGRAMS.items():
                cmd = [*cc, "-Wall", "-o", str(tmp / name), str(SRC / source), *flags]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if proc.returncode != 0:
                    (tmp / f"{name}.error").write_text(f"$ {' '.join(cmd)}\n{proc.stderr}")
            (tmp / ".done").touch()
            os.chmod(tmp, 0o755)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    built = Built(dir=str(out))
    for name in _PROGRAMS:
        built[name.replace(".", "_")] = str(out / name)
    return built


def need(built: Built, name: str) -> str:
    """The path of program ``name``; fail (not skip) the test, naming the package, if it could
    not be built here."""
    path = Path(built.dir) / name
    if not path.exists():
        error = (Path(built.dir) / f"{name}.error").read_text()
        pytest.fail(f"{name} could not be built: install {_PACKAGES.get(name, 'gcc')}\n{error}",
                    pytrace=False)
    return str(path)


def tool(name: str, package: str) -> str:
    """A debugger the test needs; fail with the way to install it if it is missing."""
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.fail(f"{name} is needed: install it ({package}; scripts/setup.sh does)",
                    pytrace=False)
    return path


# ---- /proc -----------------------------------------------------------------------------------


def status_field(pid: int | str, name: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    except OSError:
        return None
    return None


def tracer(pid: int | str) -> int:
    return int(status_field(pid, "TracerPid") or 0)


def threads_traced_by(pid: int, tracer_pid: int) -> list[int]:
    """The threads of ``pid`` whose tracer is a thread of process ``tracer_pid``."""
    mine = set(map(int, os.listdir(f"/proc/{tracer_pid}/task")))
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        if tracer(f"{pid}/task/{t}") in mine:
            out.append(int(t))
    return out


def state(pid: int | str) -> str:
    return (status_field(pid, "State") or "?")[0]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``predicate`` until it is true; the limit only ends a test that is stuck."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.01)


def session_pids(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != b"Z":
            out.append(int(name))
    return out


def kill_session(sid: int) -> list[int]:
    left: list[int] = []
    for _ in range(100):
        pids = session_pids(sid)
        if not pids:
            break
        for pid in pids:
            if pid not in left:
                left.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped tracee would not die before it
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return left


def events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if isinstance(ev, dict) and "event" in ev:
                out.append(ev)
    return out


@functools.cache
def public_launcher() -> Path:
    """A copy of bin/ and vgpu_launch/ that ``nobody`` can run."""
    root = Path(tempfile.mkdtemp(prefix="vgpu-release-launcher-"))
    os.chmod(root, 0o755)
    atexit.register(shutil.rmtree, root, True)
    shutil.copytree(REPO / "bin", root / "bin")
    shutil.copytree(REPO / "vgpu_launch", root / "vgpu_launch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() or path.parent.name == "bin" else 0o644)
    return root / "bin" / "vgpu-launch"


def clean_env(updates: Mapping[str, str | None] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith(("VGPU_LAUNCH_", "PYTEST", "ASAN_"))}
    for k, v in (updates or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def launcher_argv(args: Sequence[str], user: str | None = None) -> list[str]:
    if user == "nobody":
        return [*NOBODY, str(public_launcher()), "--log-format", "json", *args]
    return [str(LAUNCHER), "--log-format", "json", *args]


def release_argv(args: Sequence[str], user: str | None = None) -> list[str]:
    if user == "nobody":
        return [*NOBODY, str(public_launcher()), "release", *args]
    return [str(LAUNCHER), "release", *args]


def run_env(user: str | None = None,
            updates: Mapping[str, str | None] | None = None) -> dict[str, str]:
    python = SYSTEM_PYTHON if user else sys.executable
    return clean_env({"VGPU_LAUNCH_PYTHON": python, **(updates or {})})


def release(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """``vgpu-launch release ARGS`` (as ``user``)."""
    return subprocess.run(release_argv(args, user), capture_output=True, text=True,
                          env=run_env(user), timeout=60, check=False)


class Tree:
    """vgpu-launch running in the background, in a session of its own; stdout and stderr go
    to files. ``ctl`` is a FIFO that CMD may read commands from (see ``shell_loop``); in
    ``args``, ``{ctl}`` and ``{dir}`` (a fresh directory anyone may write to) are replaced."""

    def __init__(self, args: Sequence[str], *, user: str | None = None,
                 env: Mapping[str, str | None] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vgpu-release-tree-"))
        os.chmod(self.dir, 0o777)
        self.ctl = self.dir / "ctl"
        os.mkfifo(self.ctl)
        os.chmod(self.ctl, 0o666)  # past the umask: CMD may run as nobody
        self.status_file = self.dir / "status"
        self.out_path = self.dir / "stdout"
        self.err_path = self.dir / "stderr"
        words = [str(a).replace("{ctl}", str(self.ctl)).replace("{dir}", str(self.dir))
                 for a in args]
        self.argv = launcher_argv(words, user)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [build().rel_reap, str(self.status_file), *self.argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=run_env(user, env),
                start_new_session=True,
            )
        self.sid = self.proc.pid
        self._launcher = 0

    @property
    def launcher(self) -> int:
        """vgpu-launch's pid, once its tracer thread runs."""
        if not self._launcher:
            def find() -> int:
                for pid in session_pids(self.sid):
                    if status_field(pid, "PPid") == str(self.sid):
                        return pid
                return 0
            pid = wait_for(find, "vgpu-launch to start")
            wait_for(lambda: len(os.listdir(f"/proc/{pid}/task")) >= 2, "the tracer thread")
            self._launcher = pid
        return self._launcher

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in events(self.stderr()) if name is None or e["event"] == name]

    def wait_event(self, name: str, what: str = "", **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in self.events(name):
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            return None
        event: dict[str, Any] = wait_for(found, what or f"a {name} event {match}")
        return event

    def wait_line(self, prefix: str) -> str:
        def found() -> str | None:
            return next((ln for ln in self.stdout().splitlines() if ln.startswith(prefix)), None)
        line: str = wait_for(found, f"a line starting with {prefix!r} on stdout")
        return line

    def send(self, line: str) -> None:
        """One command to CMD's shell loop."""

        def opened() -> int:
            try:
                return os.open(self.ctl, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader (yet, or any more)
                if self.proc.poll() is not None:
                    raise AssertionError(f"vgpu-launch is gone\n{self.describe()}") from None
                return 0
        fd = wait_for(opened, "CMD's shell loop to read commands")
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    def wait(self, timeout: float = 60) -> int:
        """vgpu-launch's exit: its code, or -N if it died of signal N."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not finish\n{self.describe()}") from None
        raw = int(self.status_file.read_text().strip() or "-1")
        return os.WEXITSTATUS(raw) if os.WIFEXITED(raw) else -os.WTERMSIG(raw)

    def describe(self) -> str:
        return (f"argv: {self.argv}\n--- stdout\n{self.stdout()[-3000:]}\n"
                f"--- stderr\n{self.stderr()[-6000:]}")

    def close(self) -> None:
        kill_session(self.sid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A CMD that runs each line written to {ctl} as a shell command, until "exit". It holds the
# FIFO open for reading and writing, so that no line is lost between two writers and a writer
# that closes never looks like the end.
SHELL_LOOP = ["/bin/sh", "-c", 'exec 3<>"$0"; while read -r line <&3; do eval "$line" 3<&-; done',
              "{ctl}"]


@contextlib.contextmanager
def tree(args: Sequence[str], **kw: Any) -> Iterator[Tree]:
    t = Tree(args, **kw)
    try:
        yield t
    finally:
        t.close()
