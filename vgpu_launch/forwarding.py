"""Which signals vgpu-launch passes on to CMD, and how (docs/launcher.md gives every choice).

The main thread blocks every signal in ``FORWARDED`` and takes them one at a time
(siginfo.SignalWaiter); ``Forwarder.on_signal`` decides for each whether CMD must get it from
us: not when it came from the kernel for the whole terminal's group, from CMD itself, or from a
kill of the whole process group that reached CMD as well. The last case needs the tracer's help
and is kept in ``GroupSignalLedger``, whose docstring tells the whole protocol.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from .jobcontrol import STOP_SIGNALS, JobControl
from .siginfo import SI_QUEUE, SigInfo, SignalWaiter, getsiginfo, send

# Never forwarded: SIGCHLD is about vgpu-launch's own children; SIGKILL/SIGSTOP can't be caught.
NOT_FORWARDED = frozenset({signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP})
# Sent by the tracer thread to wake the main thread (thread-directed, from our own pid).
WAKE = signal.SIGRTMAX
# 32 and 33 are glibc's own (thread cancellation, setxid); Python's SIGRTMIN is 34.
FORWARDED = frozenset(range(1, signal.NSIG)) - NOT_FORWARDED - {32, 33}

# What the kernel sends to a whole process group on behalf of a terminal: keys (INT, QUIT,
# TSTP), window size (WINCH), background access (TTIN, TTOU), hang-up (HUP, CONT; to the
# session leader only) and orphaned process groups (HUP, CONT).
TERMINAL_SIGNALS = frozenset(
    {
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGTSTP,
        signal.SIGWINCH,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGHUP,
        signal.SIGCONT,
    }
)
# Signals a shell or a service manager sends to whole process groups (`kill %1`, `fg`, `bg`,
# `kill 0`): CMD's tracer notes every one CMD takes, so that one that reached both vgpu-launch
# and CMD is not forwarded a second time. High-rate signals (SIGURG for Go's preemption,
# profiling timers) stay off this list: the tracer's hot path does not stop for them.
GROUP_SIGNALS = frozenset(
    {
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGABRT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGTERM,
        signal.SIGCONT,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGWINCH,
        signal.SIGPWR,
    }
)


# -- where a signal comes from ----------------------------------------------------------------

OWN = "own"  # vgpu-launch itself: our SIGPIPE, the tracer's wake-up
FROM_CMD = "cmd"  # CMD signalled its parent (kill(getppid())) or its group (kill(0))
KERNEL = "kernel"  # si_code > 0: a terminal, a hang-up, a resource limit
USER = "user"  # kill, sigqueue, tgkill from any other process


def origin(code: int, sender: int, own_pid: int, cmd_pid: int) -> str:
    """Classify a signal that reached vgpu-launch.

    ``code`` > 0 (SI_KERNEL and the like) means the kernel sent it; <= 0 that a process did
    (SI_USER, SI_QUEUE, SI_TKILL, ...), and ``sender`` is that process.
    """
    if code > 0:
        return KERNEL
    if sender == own_pid:
        return OWN
    if sender == cmd_pid and cmd_pid > 0:
        return FROM_CMD
    return USER


def forward_kernel_signal(sig: int, *, same_group: bool, session_leader: bool) -> bool:
    """Whether a kernel-sent signal must be passed on, because CMD did not get it as well.

    Terminal signals go to a whole process group: CMD got its own copy when it is in
    vgpu-launch's group (the usual case); when CMD made a group of its own (and did not take
    the terminal) it did not, and would have as the job's leader. A hang-up goes to the
    session leader alone: when that is vgpu-launch (``setsid``, a container's PID 1 with a
    terminal), CMD would have been the leader. Any other kernel signal (SIGXCPU of our own
    CPU limit, SIGIO of our own descriptors) is about vgpu-launch itself.
    """
    if sig not in TERMINAL_SIGNALS:
        return False
    if not same_group:
        return True
    return session_leader and sig in (signal.SIGHUP, signal.SIGCONT)


def signame(sig: int) -> str:
    if signal.SIGRTMIN < sig < signal.SIGRTMAX:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


@dataclass
class Cmd:
    """CMD as both threads see it: its pid once forked, its wait status once reaped."""

    pid: int = 0
    status: int | None = None
    traced: bool = True  # false once the tracer thread has failed: nothing passes through it


# -- the group-signal ledger -------------------------------------------------------------------

# A user-sent signal that CMD may have got as well (a kill of the whole process group) while
# a thread of CMD sits in a ptrace stop: how long to wait for the tracer to say whether CMD
# took it, before forwarding it anyway.
DEDUP_WAIT = 0.1
# How long a signal CMD took stays available to match the same signal reaching vgpu-launch.
TAKEN_TTL = 2.0

_Entry = tuple[float, int, int]  # (when, signal, sender)


class GroupSignalLedger:
    """Which copies of ours a kill of the whole process group already delivered to CMD.

    The problem. ``kill -TERM -PGID`` (``kill %1``, ``fg``, ``kill 0`` from a descendant) puts
    one copy of the signal in vgpu-launch and one in CMD, with the same siginfo (``SI_USER``,
    the sender's pid) as a ``kill`` of vgpu-launch alone. CMD must get it once, so our copy may
    be forwarded only if CMD did not get its own. The main thread (``Forwarder``) looks for
    CMD's copy in three places, in this order:

    1. an entry in this ledger: the tracer saw CMD take the same signal from the same sender;
    2. CMD's shared pending set (``ShdPnd`` of /proc/CMD/status): not taken yet;
    3. a thread of CMD sitting in a ptrace stop: it may have taken it and the tracer not yet
       seen it; then the main thread waits (``wait``) for an entry, at most ``DEDUP_WAIT``.

    Entries (tracer thread, ``note``). The tracer calls ``note`` for every signal in
    ``GROUP_SIGNALS`` a thread of CMD takes from another process (``SI_USER``/``SI_QUEUE``,
    not from vgpu-launch: a forwarded ``kill`` carries our pid, a relayed ``sigqueue`` is
    recognised by ``relayed``). It writes an entry only if, at that moment, our own copy of
    the same signal from the same sender is *pending* (in our ``ShdPnd``) or *being decided
    on* (the main thread's ``SignalWaiter`` buffer, filled by the kernel as it dequeues and
    cleared by ``settle``). That is what makes the two copies one kill: a signal sent to CMD
    alone a moment before or after ours does not count. The kernel moves our copy from pending
    to the buffer between two looks, so the tracer looks at the buffer, the pending set, and
    the buffer again. Two kills of the group whose copies merged into one pending for us are
    one copy to explain: an entry is added only while fewer entries for (signal, sender) exist
    than copies of ours are outstanding.

    Each entry explains exactly one copy of ours (main thread):

    - ``take`` consumes the oldest matching entry when the main thread decides on a copy
      (then that copy is not forwarded), and clears the buffer: the copy is settled;
    - ``settle``, once the main thread has decided, consumes an entry the tracer added while
      it was deciding (CMD took its copy of the same kill meanwhile): else it would stand for
      a later copy. Both run under the ledger's lock, as ``note`` does, so an entry is either
      added before the copy is settled and consumed by it, or not added at all;
    - ``forget`` drops entries for copies the kernel discarded before we took them: sending a
      stop signal discards a pending SIGCONT and SIGCONT discards pending stop signals, so an
      entry noted for such a copy (before the signal now being handled was taken) never gets
      its copy;
    - entries older than ``TAKEN_TTL`` are dropped: a safety net, they are normally consumed
      within milliseconds.

    Queued signals we pass on ourselves (``rt_sigqueueinfo`` keeps the original sender, so CMD
    taking one looks like a group kill) are remembered by ``relayed`` and recognised by
    ``note``.
    """

    def __init__(self, own_pid: int) -> None:
        self._pid = own_pid
        self._cond = threading.Condition()
        self._taken: collections.deque[_Entry] = collections.deque(maxlen=256)
        # Queued signals we passed on in their sender's name: (when, signal, sender, value).
        self._relayed: collections.deque[tuple[float, int, int, int]] = collections.deque(
            maxlen=256
        )
        self._waiter: SignalWaiter | None = None
        self._dequeued = 0.0  # when the main thread took the signal it is deciding on

    # -- main thread ----------------------------------------------------------------------

    def attach(self, waiter: SignalWaiter | None) -> None:
        """The main thread's waiter, whose buffer shows the copy being decided on (None: no
        signal is being decided on through it)."""
        self._waiter = waiter

    def began(self) -> None:
        """The main thread has just taken a signal."""
        self._dequeued = time.monotonic()

    def take(self, sig: int, sender: int) -> bool:
        """Whether CMD took ``sig`` from ``sender`` while our own copy of it was pending or
        being decided on: the same kill of the group. If so, our copy is settled."""
        with self._cond:
            if self._consume(sig, sender):
                if self._waiter is not None:
                    self._waiter.done()
                return True
        return False

    def settle(self, sig: int, sender: int) -> None:
        """The main thread has decided on its copy of ``sig``: from now on CMD taking ``sig``
        is another kill. An entry the tracer added meanwhile is this copy's: consume it."""
        with self._cond:
            waiter = self._waiter
            if waiter is not None and waiter.taken() == (sig, sender):
                self._consume(sig, sender)
                waiter.done()

    def forget(self, sigs: frozenset[int]) -> None:
        """Drop entries for ``sigs`` noted before the signal being handled was taken."""
        before = self._dequeued
        with self._cond:
            for entry in [e for e in self._taken if e[1] in sigs and e[0] < before]:
                self._taken.remove(entry)

    def relayed(self, info: SigInfo) -> None:
        """A queued signal is being passed on in its sender's name."""
        with self._cond:
            now = time.monotonic()
            while self._relayed and self._relayed[0][0] < now - TAKEN_TTL:
                self._relayed.popleft()
            self._relayed.append((now, info.signo, info.pid, info.value))

    def wait(self, timeout: float) -> None:
        """Until the tracer notes something, at most ``timeout`` seconds."""
        with self._cond:
            self._cond.wait(timeout)

    def _consume(self, sig: int, sender: int) -> bool:
        # With self._cond held.
        taken = self._taken
        old = time.monotonic() - TAKEN_TTL
        while taken and taken[0][0] < old:
            taken.popleft()
        for entry in taken:
            if entry[1] == sig and entry[2] == sender:
                taken.remove(entry)  # the oldest: one copy of ours explains one of CMD's
                return True
        return False

    # -- tracer thread --------------------------------------------------------------------

    def note(self, sig: int, info: SigInfo) -> bool:
        """CMD took ``sig`` (``info``: from another process): whether it is the twin of a
        copy of ours, now written down."""
        waiter = self._waiter
        mine = (sig, info.pid)
        with self._cond:
            if info.code == SI_QUEUE:
                for entry in self._relayed:
                    if entry[1:] == (sig, info.pid, info.value):
                        self._relayed.remove(entry)  # one we passed on
                        return False
            taken_before = waiter is not None and waiter.taken() == mine
            pending = sig in shared_pending(self._pid)
            taken_after = waiter is not None and waiter.taken() == mine
            copies = pending + taken_before + (taken_after and not taken_before and not pending)
            held = sum(1 for e in self._taken if e[1:3] == mine)
            if held >= copies:
                return False
            self._taken.append((time.monotonic(), sig, info.pid))
            self._cond.notify_all()
            return True


# -- the main thread's decision ------------------------------------------------------------------


class Forwarder:
    """One signal that reached vgpu-launch: pass it on to CMD unless CMD has it already."""

    def __init__(self, cmd: Cmd, jobs: JobControl, log: Any, *, debug: bool) -> None:
        self.cmd = cmd
        self.jobs = jobs
        self.log = log
        self.debug = debug
        self.pid = os.getpid()
        self.ledger = GroupSignalLedger(self.pid)

    def on_signal(self, info: SigInfo) -> None:
        """Main thread, for each signal it takes (after ``ledger.began()``)."""
        sig = info.signo
        source = origin(info.code, info.pid, self.pid, self.cmd.pid)
        if source == OWN:
            return
        ledger = self.ledger
        if source != USER:
            ledger.take(sig, info.pid)  # explained by this copy: not for a later one
        if sig == signal.SIGCONT:
            self.jobs.continued()
        why = ""
        if source == FROM_CMD:
            why = "sent by CMD"
        elif source == KERNEL:
            if not forward_kernel_signal(
                sig,
                same_group=self._cmd_in_our_group(),
                session_leader=os.getsid(0) == self.pid,
            ):
                why = "from the kernel: CMD got it too, or it is about vgpu-launch"
        else:
            why = self._cmd_has_it(info)
        ledger.settle(sig, info.pid)
        if not why:
            self._forward(info)
        if self.debug:
            self.log.debug(
                "signal",
                signal=signame(sig),
                code=info.code,
                sender=info.pid,
                action=f"not forwarded: {why}" if why else "forwarded",
            )
        # The kernel discards a pending SIGCONT when a stop signal is sent, and pending stop
        # signals when SIGCONT is sent: see GroupSignalLedger.forget.
        if sig in STOP_SIGNALS:
            ledger.forget(frozenset({signal.SIGCONT}))
            self.jobs.stop_reached_us()  # may stop us here, until a SIGCONT
        elif sig == signal.SIGCONT:
            ledger.forget(STOP_SIGNALS)

    def cmd_took(self, tid: int, sig: int) -> None:
        """Tracer thread, before ``sig`` is re-injected into ``tid``: note the signals CMD takes
        from other processes, so that one sent to the whole group is not forwarded again."""
        with contextlib.suppress(Exception):  # never disturb the tracer
            cmd = self.cmd.pid
            if tid != cmd and not os.path.exists(f"/proc/{cmd}/task/{tid}"):
                return  # a descendant, not a thread of CMD
            if sig == signal.SIGCONT:
                self.jobs.cmd_continued()
            info = getsiginfo(tid)
            if info.code > 0 or info.pid == self.pid:
                return  # the kernel's, or one we forwarded with kill
            group_kill = self.ledger.note(sig, info)
            if self.debug:
                self.log.debug(
                    "cmd-took", signal=signame(sig), tid=tid, sender=info.pid, group_kill=group_kill
                )

    def _cmd_in_our_group(self) -> bool:
        try:
            return os.getpgid(self.cmd.pid) == os.getpgrp()
        except OSError:
            return True

    def _cmd_has_it(self, info: SigInfo) -> str:
        """Whether a user-sent signal reached CMD as well as us, and how we know: a ``kill`` of
        the process group. Only a standard signal can tell (GroupSignalLedger). Forwarding a
        standard signal that is still pending in CMD would change nothing anyway."""
        sig = info.signo
        ledger = self.ledger
        if ledger.take(sig, info.pid):
            return "CMD took it too (sent to the process group)"
        if sig >= signal.SIGRTMIN or not self.cmd.traced:
            return ""  # real-time signals queue: each one sent is one to deliver
        cmd = self.cmd.pid
        if not self._cmd_in_our_group():
            return ""
        deadline = 0.0
        while True:
            if ledger.take(sig, info.pid):
                return "CMD took it too (sent to the process group)"
            if sig in shared_pending(cmd):
                return "pending in CMD already (sent to the process group)"
            # Taken, but the tracer has not seen it yet: CMD waits in a ptrace stop.
            waiting = sig in GROUP_SIGNALS and in_ptrace_stop(cmd)
            if ledger.take(sig, info.pid):
                return "CMD took it too (sent to the process group)"
            if not waiting:
                return ""
            now = time.monotonic()
            if not deadline:
                deadline = now + DEDUP_WAIT
            if now >= deadline:
                return ""
            ledger.wait(min(0.005, deadline - now))

    def _forward(self, info: SigInfo) -> None:
        if self.cmd.status is not None:
            return  # CMD has been reaped: its pid may name another process already
        if info.code == SI_QUEUE and info.signo in GROUP_SIGNALS:
            self.ledger.relayed(info)
        try:
            send(self.cmd.pid, info)
        except ProcessLookupError:
            pass
        except OSError as exc:
            self.log.warning(
                "signal",
                signal=signame(info.signo),
                error=exc.strerror,
                action="could not forward it to CMD",
            )


# -- /proc --------------------------------------------------------------------------------------


def shared_pending(pid: int) -> frozenset[int]:
    """The process-directed signals pending in ``pid`` (ShdPnd of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"ShdPnd:"):
                    bits = int(line.split()[1], 16)
                    return frozenset(s for s in range(1, 65) if bits >> (s - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return frozenset()


def in_ptrace_stop(pid: int) -> bool:
    """Whether some thread of ``pid`` sits in a ptrace stop (state ``t``), waiting for the
    tracer: a signal it just took is then not yet known to the tracer."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if data[data.rindex(b")") + 2 : data.rindex(b")") + 3] == b"t":
            return True
    return False
