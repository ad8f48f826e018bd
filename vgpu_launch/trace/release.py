"""Giving processes back: detach every thread of a process, whatever stop it is in.

Requests come from other threads (the ``vgpu-launch release`` socket, the seccomp listener of
the tree's ptrace calls); only the tracer thread may make ptrace calls on its tracees, so a
request is queued and the tracer thread is woken: the requesting thread forks a child that
exits at once, and the tracer's ``waitpid(-1)``, which reaps every child of vgpu-launch,
returns for it. The tracer then serves the queue, between two ``waitpid`` returns:

- each thread of the process that we trace gets ``PTRACE_INTERRUPT``, which works in every
  state (running, blocked in a system call, parked in ``PTRACE_LISTEN`` for a group-stop);
- its next stop, whichever it is, is handled as the event loop would (a signal is passed on in
  the detach, an exec is injected first, a group-stop stays a stop) and ends in
  ``PTRACE_DETACH`` instead of ``PTRACE_CONT``;
- threads created meanwhile are found again in /proc and given the same treatment, until no
  thread of the process has this tracer.

``release_after_exec`` uses the same detach at the exec stop, right after the injection.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import procfs
from . import ptracelib as pt


class Tracer(Protocol):
    """What a release needs of the tracer (tracer.py), which owns the releaser."""

    cmd_pid: int
    tracees: set[int]
    watch_signals: frozenset[int]
    on_signal: Callable[[int, int], None] | None
    on_cmd_stopped: Callable[[int], None] | None

    def exec_stop(self, pid: int, *, release: bool = False) -> int | None: ...


GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_EVENTS = {
    pt.PTRACE_EVENT_FORK: "fork",
    pt.PTRACE_EVENT_VFORK: "vfork",
    pt.PTRACE_EVENT_CLONE: "clone",
    pt.PTRACE_EVENT_EXEC: "exec",
}


@dataclass
class Job:
    """One request: give back these processes (thread group ids)."""

    pids: list[int]
    reason: str  # "request", "ptrace-attach", "ptrace-seize", "ptrace-traceme"
    by: dict[str, Any]  # who asked
    tree: bool = False  # and every descendant we trace
    released: dict[int, int] = field(default_factory=dict)  # pid -> threads detached
    not_traced: list[int] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    open: int = 0


@dataclass
class _Proc:
    pid: int
    job: Job
    pending: set[int] = field(default_factory=set)
    threads: int = 0
    stops: collections.Counter[str] = field(default_factory=collections.Counter)
    group_stopped: bool = False


def _alive(pid: int, tid: int) -> bool:
    """Not a zombie: a zombie leader reports no stop until its whole group has exited."""
    state = procfs.status_field(f"{pid}/task/{tid}", "State")
    return state is not None and state[:1] not in ("Z", "X", "")


def after_exec_subject(exe: str, argv: Sequence[str]) -> str:
    """What ``release_after_exec`` patterns are matched against: the program's real path (the
    interpreter, for a script), then argv[1:], joined with single spaces."""
    return " ".join([exe, *argv[1:]])


def after_exec_match(patterns: Sequence[str], exe: str, argv: Sequence[str]) -> str | None:
    """The first pattern (fnmatch: ``*`` also matches ``/`` and spaces) that matches."""
    subject = after_exec_subject(exe, argv)
    for pat in patterns:
        if fnmatch.fnmatchcase(subject, pat):
            return pat
    return None


class Releaser:
    """The tracer thread's side of giving processes back (see the module's docstring)."""

    def __init__(
        self,
        *,
        after_exec: Sequence[str] = (),
        on_released: Callable[[Job, int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.after_exec = tuple(after_exec)
        self.on_released = on_released
        self.queue: collections.deque[Job] = collections.deque()
        self.tids: dict[int, _Proc] = {}  # threads interrupted, not yet stopped
        self.tracer: Tracer | None = None
        self.tracer_tid = 0
        self.count = 0  # processes released
        self.closed = False  # the tracer has stopped: nothing can be released any more

    # -- any thread ----------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job`` and wake the tracer thread; ``job.done`` is set once it is served."""
        if self.closed:
            job.done.set()
            return
        self.queue.append(job)
        if self.closed:  # closed meanwhile: nobody will serve the queue
            job.done.set()
            return
        try:
            child = os.fork()
        except OSError:
            return  # served at the next exit of any child or tracee
        if child == 0:
            os._exit(0)

    def close(self) -> None:
        """The tracer has stopped (CMD exited, or the tracer failed): answer what waits."""
        self.closed = True
        while self.queue:
            self.queue.popleft().done.set()
        for proc in list(self.tids.values()):
            proc.job.done.set()

    # -- the tracer thread -------------------------------------------------------------------

    def serve(self) -> None:
        while self.queue:
            job = self.queue.popleft()
            pids = list(dict.fromkeys(job.pids))
            if job.tree:
                for pid in list(pids):
                    pids += [d for d in procfs.descendants(pid) if d not in pids]
            job.pids = pids
            job.open = len(pids) + 1  # +1: held until every process has been started
            for pid in pids:
                self._start(pid, job)
            self._close_one(job)

    def _start(self, pid: int, job: Job) -> None:
        proc = _Proc(pid, job)
        self._scan(proc)
        if not proc.pending:
            self._finish(proc)

    def _scan(self, proc: _Proc) -> None:
        """Interrupt every thread of the process that is ours and not yet on its way out."""
        for tid in procfs.tasks(proc.pid):
            if tid in self.tids or tid in proc.pending:
                continue
            if procfs.tracer_of(f"{proc.pid}/task/{tid}") != self.tracer_tid:
                continue
            if not _alive(proc.pid, tid):
                continue
            try:
                pt.ptrace(pt.PTRACE_INTERRUPT, tid, 0, 0)
            except pt.PtraceError as exc:
                if exc.errno != errno.ESRCH:
                    raise
                continue
            self.tids[tid] = proc
            proc.pending.add(tid)

    def on_stop(self, tid: int, status: int) -> None:
        """A stop of a thread we interrupted: handle it as the loop would, then detach."""
        proc = self.tids.pop(tid)
        proc.pending.discard(tid)
        tracer = self.tracer
        assert tracer is not None
        sig = (status >> 8) & 0xFF
        event = status >> 16
        other: _Proc | None = None
        try:
            if event == 0:
                kind = "signal-delivery"
                if sig in tracer.watch_signals and tracer.on_signal is not None:
                    tracer.on_signal(tid, sig)
                pt.ptrace(pt.PTRACE_DETACH, tid, 0, sig)
            elif event == pt.PTRACE_EVENT_STOP and sig in GROUP_STOP_SIGNALS:
                # Detached in a group-stop, it stays stopped until a SIGCONT, as it would.
                kind = "group-stop"
                proc.group_stopped = True
                if tid == tracer.cmd_pid and tracer.on_cmd_stopped is not None:
                    tracer.on_cmd_stopped(sig)
                pt.ptrace(pt.PTRACE_DETACH, tid, 0, 0)
            elif event == pt.PTRACE_EVENT_STOP:
                kind = "running"  # our interrupt, or a new thread's first stop
                pt.ptrace(pt.PTRACE_DETACH, tid, 0, 0)
            elif event == pt.PTRACE_EVENT_EXEC:
                kind = "exec"  # injected first, then detached
                former = tracer.exec_stop(tid, release=True)
                if former is not None:  # a non-leader exec'd: its old id is gone
                    other = self._drop(former)
            else:
                kind = _EVENTS.get(event, f"event {event}")
                pt.ptrace(pt.PTRACE_DETACH, tid, 0, 0)
        except pt.PtraceError as exc:
            if exc.errno != errno.ESRCH:
                raise
            kind = "gone"  # killed meanwhile: its exit is reported like any other
        else:
            proc.threads += 1
        proc.stops[kind] += 1
        tracer.tracees.discard(tid)
        for p in (proc, other) if other is not None and other is not proc else (proc,):
            self._scan(p)
            if not p.pending:
                self._finish(p)

    def forget(self, tid: int) -> None:
        """``tid`` exited, or left through a non-leader exec: it will not stop again."""
        proc = self._drop(tid)
        if proc is not None:
            self._scan(proc)
            if not proc.pending:
                self._finish(proc)

    def _drop(self, tid: int) -> _Proc | None:
        proc = self.tids.pop(tid, None)
        if proc is not None:
            proc.pending.discard(tid)
        return proc

    def _finish(self, proc: _Proc) -> None:
        job = proc.job
        if proc.threads:
            job.released[proc.pid] = proc.threads
            self.count += 1
            if self.on_released is not None:
                self.on_released(
                    job,
                    proc.pid,
                    {
                        "threads": proc.threads,
                        "stops": dict(proc.stops),
                        "stays_stopped": proc.group_stopped,
                    },
                )
        elif os.path.exists(f"/proc/{proc.pid}"):
            job.not_traced.append(proc.pid)
        else:
            job.gone.append(proc.pid)
        self._close_one(job)

    def _close_one(self, job: Job) -> None:
        job.open -= 1
        if job.open <= 0:
            job.done.set()

    # -- release_after_exec ------------------------------------------------------------------

    def match_after_exec(self, pid: int, exe: str) -> str | None:
        """The pattern that gives ``pid`` back right after its exec, or None."""
        if not self.after_exec:
            return None
        argv = procfs.cmdline(pid)
        if argv is None:
            return None
        return after_exec_match(self.after_exec, exe, argv)

    def released_after_exec(self, pid: int, pattern: str) -> None:
        self.count += 1
        if self.on_released is not None:
            job = Job([pid], "release_after_exec", {"pattern": pattern})
            self.on_released(job, pid, {"threads": 1, "stops": {"exec": 1}, "stays_stopped": False})
