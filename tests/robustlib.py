"""Plumbing shared by the robustness tests (test_faults, test_strict, test_security, test_soak,
test_config_errors, test_stack_properties); independent of conftest.py.

- ``build()``: compiles tests/robust_programs into a world-readable directory under /tmp (tests
  run some processes as ``nobody``), once per source hash.
- ``launch()``: runs ``bin/vgpu-launch --log-format json ...`` inside ``rtool reap`` (a child
  subreaper, so that nothing is ever left to a PID 1 that does not reap) in a session of its
  own, with a time limit; afterwards it checks that no process of that session is left, and
  kills (by pid) and reports any that is.
- ``Tree``: the same for tests that act on the tree while it runs (freeze the tracer, kill it).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "tests" / "robust_programs"
LAUNCHER = REPO / "bin" / "vgpu-launch"
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike an interpreter under /root
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]

# name -> (compiler argv prefix, source, extra flags)
_PROGRAMS: dict[str, tuple[list[str], str, list[str]]] = {
    "rprobe": (["gcc"], "rprobe.c", []),
    "rprobe32": (["gcc", "-m32"], "rprobe.c", []),
    "rtool": (["gcc"], "rtool.c", ["-pthread"]),
    "soak": (["gcc"], "soak.c", ["-pthread"]),
    "execkill": (["gcc"], "execkill.c", []),
    "reexec": (["gcc"], "reexec.c", []),
    "stuckld": (["gcc"], "stuckld.c", ["-nostdlib", "-static-pie", "-fPIE"]),
    "librobustmark.so": (["gcc"], "librobustmark.c", ["-shared", "-fPIC"]),
}


class Built(dict[str, str]):
    def __getattr__(self, name: str) -> str:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def build() -> Built:
    sources = sorted(SRC.glob("*.c"))
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    digest.update(repr(_PROGRAMS).encode())
    out = Path(tempfile.gettempdir()) / f"vgpu-robust-{os.getuid()}-{digest.hexdigest()[:12]}"
    lock = out.with_suffix(".lock")
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        built = Built(dir=str(out), lib=str(out / "librobustmark.so"))
        if not (out / ".done").exists():
            tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
            for name, (cc, source, flags) in _PROGRAMS.items():
                cmd = [*cc, "-O2", "-Wall", "-o", str(tmp / name), str(SRC / source), *flags]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if proc.returncode != 0 and name != "rprobe32":
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
            (tmp / ".done").touch()
            os.chmod(tmp, 0o755)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        for name in _PROGRAMS:
            if (out / name).exists():
                built[name.replace(".", "_")] = str(out / name)
        return built


# Run vgpu-launch with the interpreter running the tests (it has the packages; saves a lookup).
FAST = {"VGPU_LAUNCH_PYTHON": sys.executable}


@functools.cache
def test_hooks_fd() -> int:
    """The memfd that makes vgpu-launch honour VGPU_LAUNCH_TEST_FAULT (vgpu_launch/testhooks.py):
    pass it with ``pass_fds``."""
    return os.memfd_create("vgpu-launch-test-hooks", 0)


def reap_status(out: str) -> int:
    """The status ``rtool reap`` printed for its child (negative: killed by that signal)."""
    m = re.search(r"^reap status=(-?\d+)$", out, re.M)
    assert m, out
    return int(m.group(1))


def all_threads_traced(pid: int) -> bool:
    """Whether every thread of ``pid`` has a tracer (strace -p attaches them one by one)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return bool(tasks) and all(
            "TracerPid:\t0\n" not in Path(f"/proc/{pid}/task/{t}/status").read_text()
            for t in tasks
        )
    except OSError:
        return False


def public_dir(prefix: str) -> Path:
    """A fresh directory that ``nobody`` can read and enter (pytest's tmp_path cannot)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


def clean_env(updates: Mapping[str, str | None] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "LD_PRELOAD" and not k.startswith("VGPU_LAUNCH_") and not k.startswith("PYTEST")
    }
    for k, v in (updates or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


# ---- /proc ----------------------------------------------------------------------------------


def stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (index 0 = state), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].decode().split()


def state(pid: int | str) -> str | None:
    fields = stat_fields(pid)
    return fields[0] if fields else None


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = stat_fields(name)
        if fields and int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(name))
    return out


def session_tids(sid: int, exclude: Sequence[int] = ()) -> set[int]:
    """Every thread of every live process of session ``sid`` (processes in ``exclude`` left
    out)."""
    tids: set[int] = set()
    for pid in session_pids(sid):
        if pid in exclude:
            continue
        with contextlib.suppress(OSError):
            tids.update(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    return tids


def stopped(pids: Sequence[int]) -> dict[int, str]:
    """The processes (any of their threads) in a stopped state, t or T."""
    out = {}
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            st = state(f"{pid}/task/{tid}")
            if st in ("t", "T"):
                out[int(tid)] = st
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process left in session ``sid`` (one by one, by pid); return them."""
    left: list[int] = []
    for _ in range(50):
        pids = session_pids(sid)
        if not pids:
            break
        for pid in pids:
            if pid not in left:
                left.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return left


# ---- running vgpu-launch ----------------------------------------------------------------------


@dataclass
class Run:
    returncode: int  # vgpu-launch's: exit code, or -N for death by signal N
    stdout: bytes
    stderr: str
    argv: list[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # stderr lines that are not JSON events

    def __post_init__(self) -> None:
        for line in self.stderr.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                ev = None
            if isinstance(ev, dict) and "event" in ev:
                self.events.append(ev)
            elif line:
                self.lines.append(line)

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    @property
    def end(self) -> dict[str, Any]:
        ends = self.of("end")
        assert len(ends) == 1, self.describe()
        return ends[0]

    def execs(self, exe_suffix: str = "") -> list[dict[str, Any]]:
        return [e for e in self.of("exec") if str(e.get("exe", "")).endswith(exe_suffix)]

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    def describe(self, tail: int = 40) -> str:
        err = self.stderr.splitlines()
        return (
            f"argv: {self.argv}\nreturncode: {self.returncode}\nstdout: {self.out[-3000:]}\n"
            f"stderr (last {tail} lines):\n" + "\n".join(line[:1500] for line in err[-tail:])
        )


def _decode_status(raw: int) -> int:
    if os.WIFEXITED(raw):
        return os.WEXITSTATUS(raw)
    if os.WIFSIGNALED(raw):
        return -os.WTERMSIG(raw)
    return 1000 + raw


@functools.cache
def public_launcher() -> Path:
    """A copy of bin/ and vgpu_launch/ that ``nobody`` can run: the checkout itself may sit
    in a directory only root can enter."""
    root = public_dir("vgpu-robust-launcher-")
    atexit.register(shutil.rmtree, root, True)
    shutil.copytree(REPO / "bin", root / "bin")
    shutil.copytree(
        REPO / "vgpu_launch", root / "vgpu_launch", ignore=shutil.ignore_patterns("__pycache__")
    )
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() or path.parent.name == "bin" else 0o644)
    return root / "bin" / "vgpu-launch"


def launcher_argv(
    built: Built,
    args: Sequence[str],
    *,
    user: str | None = None,
    log_format: str = "json",
    wrap: Sequence[str] = (),
) -> list[str]:
    """``wrap``: a command that runs vgpu-launch (``capsh --drop=... -- -c 'exec "$0" "$@"'``)."""
    prefix = NOBODY if user == "nobody" else []
    launcher = public_launcher() if user == "nobody" else LAUNCHER
    fmt = ["--log-format", log_format] if log_format else []
    return [*wrap, *prefix, str(launcher), *fmt, *args]


def launch(
    built: Built,
    args: Sequence[str],
    *,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 60,
    user: str | None = None,
    input: bytes | None = None,
    log_format: str = "json",
    pass_fds: Sequence[int] = (),
    wrap: Sequence[str] = (),
) -> Run:
    """Run vgpu-launch to the end; assert that nothing of its session is left behind."""
    updates: dict[str, str | None] = {"VGPU_LAUNCH_PYTHON": SYSTEM_PYTHON} if user else {}
    updates.update(env or {})
    argv = launcher_argv(built, args, user=user, log_format=log_format, wrap=wrap)
    with tempfile.NamedTemporaryFile(prefix="vgpu-robust-status-") as sf:
        proc = subprocess.Popen(
            [built.rtool, "reap", "-s", sf.name, *argv],
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(updates),
            start_new_session=True,
            pass_fds=pass_fds,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            left = kill_session(proc.pid)
            out, err = proc.communicate()
            raise AssertionError(
                f"vgpu-launch did not finish within {timeout}s; killed {left}\n"
                + Run(-1, out, err.decode(errors="replace"), argv).describe()
            ) from None
        raw = Path(sf.name).read_text().strip()
    left = kill_session(proc.pid)
    run = Run(_decode_status(int(raw)) if raw else -1000, out, err.decode(errors="replace"), argv)
    assert not left, f"processes left behind: {left}\n{run.describe()}"
    return run


class Tree:
    """vgpu-launch running in the background (inside ``rtool reap``, in its own session)."""

    def __init__(
        self,
        built: Built,
        args: Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        user: str | None = None,
        stdin: Any = subprocess.DEVNULL,
        stderr_path: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.built = built
        # Closed in close(): the tree outlives this constructor.
        self.status_file = tempfile.NamedTemporaryFile(prefix="vgpu-robust-status-")  # noqa: SIM115
        self._err = (
            open(stderr_path, "w+b")  # noqa: SIM115
            if stderr_path
            else tempfile.TemporaryFile(prefix="vgpu-robust-stderr-")  # noqa: SIM115
        )
        updates: dict[str, str | None] = {"VGPU_LAUNCH_PYTHON": SYSTEM_PYTHON} if user else {}
        updates.update(env or {})
        self.argv = launcher_argv(built, args, user=user)
        self.proc = subprocess.Popen(
            [built.rtool, "reap", "-s", self.status_file.name, *self.argv],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=clean_env(updates),
            start_new_session=True,
            pass_fds=pass_fds,
        )
        self.sid = self.proc.pid
        self._launcher = 0

    @property
    def launcher(self) -> int:
        """vgpu-launch's pid (``setpriv`` and ``bin/vgpu-launch`` exec, so it is reap's child)."""
        if not self._launcher:
            self._launcher = wait_for(
                lambda: (children(self.sid) or [0])[0], 10, "vgpu-launch to start"
            )
            # bin/vgpu-launch is a shell script that execs python: wait for the exec.
            wait_for(
                lambda: "python" in Path(f"/proc/{self._launcher}/comm").read_text()
                or len(os.listdir(f"/proc/{self._launcher}/task")) > 1,
                10,
                "vgpu-launch's interpreter",
            )
        return self._launcher

    def tracer_ready(self, timeout: float = 10) -> None:
        """Wait until the tracer thread exists (vgpu-launch has two threads)."""
        wait_for(
            lambda: len(os.listdir(f"/proc/{self.launcher}/task")) >= 2, timeout, "tracer thread"
        )

    def freeze(self) -> None:
        """Stop vgpu-launch (tracer thread included): tracees that reach a ptrace stop stay
        there, unseen, until ``thaw``."""
        os.kill(self.launcher, signal.SIGSTOP)
        wait_for(
            lambda: all(
                state(f"{self.launcher}/task/{t}") in ("T", "t", None)
                for t in os.listdir(f"/proc/{self.launcher}/task")
            ),
            10,
            "vgpu-launch to stop",
        )

    def thaw(self) -> None:
        os.kill(self.launcher, signal.SIGCONT)

    def pids(self) -> list[int]:
        return session_pids(self.sid)

    def tree_pids(self) -> list[int]:
        """The processes of CMD's tree: the session without reap and vgpu-launch."""
        return [p for p in self.pids() if p not in (self.sid, self.launcher)]

    def wait(self, timeout: float = 60) -> Run:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            left = kill_session(self.sid)
            self.proc.communicate()
            raise AssertionError(
                f"did not finish within {timeout}s; killed {left}\n{self.stderr()[-4000:]}"
            ) from None
        raw = Path(self.status_file.name).read_text().strip()
        left = kill_session(self.sid)
        run = Run(_decode_status(int(raw)) if raw else -1000, out, self.stderr(), self.argv)
        assert not left, f"processes left behind: {left}\n{run.describe()}"
        return run

    def stderr(self) -> str:
        self._err.flush()
        with open(self._err.fileno(), "rb", closefd=False) as f:
            f.seek(0)
            return f.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            kill_session(self.sid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.communicate(timeout=10)
        self._err.close()
        self.status_file.close()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def fifo(directory: Path, name: str = "go") -> Iterator[Path]:
    path = directory / name
    os.mkfifo(path, 0o666)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def release(fifo_path: Path) -> None:
    """Unblock an ``rtool event`` waiting on ``fifo_path``."""
    fd = os.open(fifo_path, os.O_WRONLY)
    try:
        os.write(fd, b"g")
    finally:
        os.close(fd)


def python_for(user: str | None) -> str:
    return SYSTEM_PYTHON if user else sys.executable
