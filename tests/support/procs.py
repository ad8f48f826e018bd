"""Processes as the kernel shows them: /proc readers, waiting for a state, signals.

Every wait in the tests is bounded by a deadline on something observable (a state in /proc, a
line of output, a file), never a bare sleep: ``wait_for(what, predicate, timeout)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from vgpu_launch.trace import ptracelib as pt

T = TypeVar("T")


def wait_for(
    what: str,
    predicate: Callable[[], T | None],
    timeout: float = 20.0,
    interval: float = 0.005,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something true, and return that; after ``timeout``
    seconds fail, naming ``what`` (and adding ``describe()``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


@contextlib.contextmanager
def held_at_exec(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Iterator[int]:
    """``argv`` started as this process's tracee and held at its exec event, the moment
    vgpu-launch's tracer reads it: the new program is set up (arguments, environment, auxv,
    mappings) and has run no instruction. Killed on leaving."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(w)
            if os.read(r, 1) == b"g":
                os.execve(argv[0], list(argv), os.environ if env is None else env)
        finally:
            os._exit(127)
    os.close(r)
    try:
        pt.seize(pid, pt.PTRACE_O_TRACEEXEC)
        os.write(w, b"g")
        _, status = os.waitpid(pid, pt.WALL)
        assert status >> 16 == pt.PTRACE_EVENT_EXEC, hex(status)
        yield pid
    finally:
        os.close(w)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, pt.WALL)


# ---- /proc ----------------------------------------------------------------------------------


def stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (index 0: state, 1: ppid, 2: pgid, 3: sid),
    or None if there is no such process.  ``pid`` may be "PID/task/TID"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].decode().split()


def state(pid: int | str) -> str | None:
    """The state letter of a process or thread (R, S, D, T, t, Z...); None when it is gone."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def ppid(pid: int) -> int | None:
    """The parent of ``pid``; None when it is gone."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def status_field(pid: int | str, name: str) -> str | None:
    """One field of /proc/PID/status (``TracerPid``, ``SigIgn``...); None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (children of any of its threads)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(entry)
            if fields and int(fields[1]) == pid:
                out.append(int(entry))
    return out


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
    """The threads of ``pids`` in a stopped state, t or T."""
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


def all_threads_traced(pid: int) -> bool:
    """Whether every thread of ``pid`` has a tracer (strace -p attaches them one by one)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return bool(tasks) and all(
        status_field(f"{pid}/task/{t}", "TracerPid") not in ("0", None) for t in tasks
    )


def tracer_pid(pid: int | str) -> int:
    """The thread tracing ``pid`` (a process, or "PID/task/TID"): 0 for none, or when gone."""
    return int(status_field(pid, "TracerPid") or 0)


def threads_traced_by(pid: int, tracer: int) -> list[int]:
    """The threads of ``pid`` whose tracer is a thread of process ``tracer`` (either gone:
    OSError, so that a process that has ended never passes for an untraced one)."""
    mine = {int(t) for t in os.listdir(f"/proc/{tracer}/task")}
    return [
        int(t) for t in os.listdir(f"/proc/{pid}/task") if tracer_pid(f"{pid}/task/{t}") in mine
    ]


def mask_of(*sigs: int) -> int:
    """A signal set as /proc/PID/status shows it (SigIgn, SigBlk): bit N-1 for signal N."""
    bits = 0
    for s in sigs:
        bits |= 1 << (s - 1)
    return bits


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


# ---- synchronising with a program -------------------------------------------------------------


@contextlib.contextmanager
def fifo(directory: Path, name: str = "go") -> Iterator[Path]:
    """A named pipe that a program (``rtool event``) waits on until ``release``."""
    path = directory / name
    os.mkfifo(path, 0o666)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def release(fifo_path: Path) -> None:
    """Unblock a program waiting on ``fifo_path``."""
    fd = os.open(fifo_path, os.O_WRONLY)
    try:
        os.write(fd, b"g")
    finally:
        os.close(fd)


# ---- signals ----------------------------------------------------------------------------------


def parse_sig(line: str) -> dict[str, int]:
    """``sig=N code=C pid=P value=V`` (a line of sigrec) as a dict."""
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}


def libc_sigqueue(pid: int, sig: int, value: int) -> None:
    """sigqueue(3): send ``sig`` with a value (SI_QUEUE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sigqueue(ctypes.c_int(pid), ctypes.c_int(sig), ctypes.c_void_p(value)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ignore(signum: int, frame: object) -> None:
    """Stands for SIG_IGN in the test process; a handler, unlike SIG_IGN, is not inherited."""


# Python itself ignores these and restores them for the children it starts (subprocess's
# restore_signals); the state they start in says nothing about how pytest was started.
_PYTHONS_OWN = {signal.SIGPIPE, signal.SIGXFSZ}


def reset_inherited_signal_state() -> list[int]:
    """Make every process the tests start begin with default signal dispositions and an empty
    signal mask, however the test process itself was started: under ``nohup`` SIGHUP is
    ignored, in a shell's background job SIGINT and SIGQUIT are, and both are inherited
    through fork and exec.  A signal this process was given ignored is caught by a handler that
    does nothing instead: the test process still ignores it in effect (a hang-up does not end
    a ``nohup`` run), and exec resets a caught signal to its default action in every child.
    Returns the signals so changed."""
    changed = []
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP) or sig in _PYTHONS_OWN:
            continue
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, _ignore)
                changed.append(sig)
        except (OSError, ValueError):  # signals that libc keeps for itself
            continue
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    return changed
