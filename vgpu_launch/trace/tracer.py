"""The event loop: follow every thread and process of CMD's tree, re-inject at every exec.

One blocking ``waitpid(-1, __WALL)``; no polling, no per-syscall stops. Runs in its own thread
(the ptrace tracer is a thread): if this thread ever dies, the kernel detaches every tracee and
lets it run on (or kills the tree, with PTRACE_O_EXITKILL in strict mode), so no bug here can
leave a process stopped.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import privileges
from . import ptracelib as pt
from .injector import Outcome, inject
from .policy import Decision, Policy
from .release import Releaser

_GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_CREATION = {
    pt.PTRACE_EVENT_FORK: "fork",
    pt.PTRACE_EVENT_VFORK: "vfork",
    pt.PTRACE_EVENT_CLONE: "clone",
}


class FaultInjected(RuntimeError):
    """Raised by the test hook VGPU_LAUNCH_TEST_FAULT."""


@dataclass
class Stats:
    counts: dict[str, int] = field(default_factory=lambda: {d.value: 0 for d in Decision})
    spawned: int = 0
    stops: int = 0
    tracees_max: int = 0


class Tracer:
    def __init__(
        self,
        policy: Policy,
        *,
        strict: bool,
        unusable: dict[int, tuple[str, ...]] | None = None,
        on_exec: Callable[[Outcome], None],
        on_event: Callable[..., None] | None = None,
        on_cmd_stopped: Callable[[int], None] | None = None,
        on_signal: Callable[[int, int], None] | None = None,
        watch_signals: frozenset[int] = frozenset(),
        fault_at_exec: int = 0,
        kill_from_exec: int = 0,
        releaser: Releaser | None = None,
    ) -> None:
        self.policy = policy
        self.unusable = unusable or {}  # word size -> preload libraries it cannot load
        self.strict = strict
        self.options = pt.FOLLOW | (pt.PTRACE_O_EXITKILL if strict else 0)
        self.on_exec = on_exec
        self.on_event = on_event
        self.on_cmd_stopped = on_cmd_stopped
        # on_signal(tid, sig): a tracee is about to take one of watch_signals (called before
        # it is re-injected; the launcher tells signals CMD got itself from forwarded ones).
        self.on_signal = on_signal
        self.watch_signals = watch_signals if on_signal is not None else frozenset()
        # The test suite's hooks (testhooks.py); never set in production.
        self.fault_at_exec = fault_at_exec
        self.kill_from_exec = kill_from_exec
        # Without CAP_SYS_PTRACE, traced setuid/setgid and file-capability programs run
        # without their privileges: look at every exec for what it lost (two or three
        # system calls; none at all under root).
        self.check_privileges = not privileges.tracer_keeps_privileges()
        self.tracees: set[int] = set()
        # pid -> the number of its latest exec (counted over the whole tree), while it lives
        self.execs: dict[int, int] = {}
        # Threads parked in PTRACE_LISTEN (group-stopped) since their last report: the only
        # tracees that sit in a ptrace stop this loop is not about to end (forwarding.py).
        self.parked: set[int] = set()
        self.exec_count = 0  # execs in the whole tree so far: each one's number
        self.stats = Stats()
        self.cmd_pid = 0
        # Giving processes back (release.py): requests are served between two waitpid returns.
        self.releaser = releaser if releaser is not None else Releaser()
        self.releaser.tracer = self

    def seize(self, pid: int) -> None:
        pt.seize(pid, self.options)
        self.tracees.add(pid)

    def run(self, cmd_pid: int) -> int:
        """Serve events until CMD (``cmd_pid``) has exited; return its wait status."""
        waitpid = os.waitpid
        cont = pt.cont
        listen = pt.listen
        tracees = self.tracees
        parked = self.parked
        stats = self.stats
        on_signal = self.on_signal
        watched = self.watch_signals
        exec_of = self.execs
        self.cmd_pid = cmd_pid
        rel = self.releaser
        rel.tracer_tid = threading.get_native_id()
        releasing = rel.tids  # threads being given back: their next stop ends in a detach
        queue = rel.queue
        while True:
            try:
                tid, status = waitpid(-1, pt.WALL)
            except ChildProcessError:
                raise RuntimeError("no tracee left before CMD's exit was seen") from None
            stats.stops += 1
            if parked:
                parked.discard(tid)  # it reports again: no longer (or soon not) parked
            if status & 0xFF != 0x7F:  # exited or killed
                tracees.discard(tid)
                exec_of.pop(tid, None)
                # -- release: a thread on its way out; a requester's wake-up child -----------
                if releasing:
                    rel.forget(tid)
                if queue:
                    rel.serve()
                # ---------------------------------------------------------------------------
                if self.on_event is not None:
                    self.on_event("exit", pid=tid, status=status)
                if tid == cmd_pid:
                    return status
                continue
            sig = (status >> 8) & 0xFF
            event = status >> 16
            try:
                if releasing and tid in releasing:  # release: detach at this stop
                    rel.on_stop(tid, status)
                    continue
                if event == 0:
                    # Signal-delivery-stop: re-inject the signal, untouched. The hot path.
                    if sig in watched:
                        on_signal(tid, sig)  # type: ignore[misc]
                    cont(tid, sig)
                elif event == pt.PTRACE_EVENT_STOP:
                    if sig in _GROUP_STOP_SIGNALS:
                        # Group-stop (job control): stay stopped until SIGCONT.
                        listen(tid)
                        parked.add(tid)
                        if tid == cmd_pid and self.on_cmd_stopped is not None:
                            self.on_cmd_stopped(sig)
                    else:
                        # A new tracee's first stop (it may come before its parent's event),
                        # or the wake-up after SIGCONT.
                        if tid not in tracees:
                            tracees.add(tid)
                            stats.spawned += 1
                            if len(tracees) > stats.tracees_max:
                                stats.tracees_max = len(tracees)
                        cont(tid, 0)
                elif event == pt.PTRACE_EVENT_EXEC:
                    if self.exec_count + 1 == self.fault_at_exec:
                        raise FaultInjected(f"test fault at exec #{self.fault_at_exec} (pid {tid})")
                    former = self.exec_stop(tid)
                    if former is not None and releasing:
                        rel.forget(former)
                elif event in _CREATION:
                    # The child is counted at its own first stop; its id is needed only for
                    # the debug log.
                    if self.on_event is not None:
                        self.on_event(_CREATION[event], pid=pt.geteventmsg(tid), parent=tid)
                    cont(tid, 0)
                else:
                    cont(tid, 0)
            except pt.PtraceError as exc:
                if exc.errno != errno.ESRCH:
                    raise
                # The thread died (SIGKILL, or its group exec'd) after reporting this stop.

    def exec_stop(self, pid: int, *, release: bool = False) -> int | None:
        """Inject at an exec stop, then continue ``pid`` (or detach it: ``release``, or a
        ``release_after_exec`` match). Returns the former thread id of a non-leader exec."""
        self.exec_count += 1
        seq = self.exec_count
        former = pt.geteventmsg(pid)
        if self.kill_from_exec and seq >= self.kill_from_exec:  # killed while held here
            os.kill(pid, signal.SIGKILL)
        if former != pid:
            # A non-leader thread exec'd: it now has the leader's id; its old id never
            # reports again.
            self.tracees.discard(former)
        self.execs[pid] = seq
        outcome = inject(pid, self.policy)
        outcome.exec_seq, outcome.execs = seq, self.execs
        if former != pid:
            outcome.former_tid = former
        libs = self.unusable.get(outcome.word)
        if libs and outcome.decision.gives_preload:
            note = (
                f"{outcome.word * 8}-bit program: ld.so will refuse {', '.join(libs)} "
                "(no build for this word size)"
            )
            outcome.note = f"{outcome.note}; {note}" if outcome.note else note
            if self.strict:
                outcome.decision = Decision.FAILED
                outcome.reason = note
        if self.check_privileges and outcome.decision is not Decision.GONE:
            outcome.lost = privileges.lost(pid, outcome.exe)
        self.stats.counts[outcome.decision.value] += 1
        if outcome.decision is Decision.FAILED and self.strict:
            # Strict: it must not run a single instruction without the shim. SIGKILL ends
            # the exec stop; its exit is reported like any other.
            os.kill(pid, signal.SIGKILL)
            outcome.killed = True
            self.on_exec(outcome)
            return former if former != pid else None
        # release_after_exec: injected, and given back before its first instruction
        pattern = None if release else self.releaser.match_after_exec(pid, outcome.exe)
        try:
            if release or pattern is not None:
                pt.ptrace(pt.PTRACE_DETACH, pid, 0, 0)
                self.tracees.discard(pid)
            else:
                pt.cont(pid, 0)
        finally:  # logged even if it was killed meanwhile (ESRCH)
            self.on_exec(outcome)
        if pattern is not None:
            self.releaser.released_after_exec(pid, pattern)
        return former if former != pid else None
