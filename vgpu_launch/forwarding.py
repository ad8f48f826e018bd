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
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from .jobcontrol import STOP_SIGNALS, JobControl
from .procfs import cpu_use, is_thread_of, owed_stop, shared_pending
from .siginfo import SI_QUEUE, SI_USER, SigInfo, SignalWaiter, getsiginfo, send

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

# While the main thread waits for the tracer (a thread of CMD sits in a stop the tracer has
# not dealt with yet), how often it looks again; an entry wakes it at once.
POLL = 0.005
# How long a queued signal we passed on stays recognisable when CMD takes it.
RELAYED_TTL = 2.0
# How much CPU time (in seconds) the main thread may use while the tracer looks again for a
# copy of ours on its way out of sigwaitinfo (see GroupSignalLedger): the tail of one system
# call; a main thread busy elsewhere uses it up.
IN_TRANSIT = 0.005
# How much CPU time the sender of CMD's copy may use, still running, while the tracer looks
# again for ours: it may be in the middle of kill(-PGID), between CMD and vgpu-launch, which
# takes microseconds of CPU. CPU time, not wall time: a sender or a tracer that a busy host
# keeps off the CPU uses none, and the look goes on.
KILL_IN_FLIGHT = 0.05
# However the CPU times go, the tracer holds CMD's thread this long at most.
NOTE_LIMIT = 2.0


class _CpuClock:
    """The CPU time a process (or one of its threads) has used since a start, in seconds, and
    whether it is on a CPU (state R) at the last look; wall time where the kernel keeps no
    CPU time."""

    def __init__(self, pid: int, tid: int | None = None) -> None:
        self._pid, self._tid = pid, tid
        self.running = False
        self.restart()

    def restart(self) -> None:
        self.running, self._cpu = cpu_use(self._pid, self._tid)
        self._wall = time.monotonic()

    def used(self) -> float:
        self.running, cpu = cpu_use(self._pid, self._tid)
        if cpu is None or self._cpu is None:
            return time.monotonic() - self._wall
        return (cpu - self._cpu) / 1e9


@dataclass
class _Entry:
    epoch: int  # which copy of ours (of this signal) it explains: see GroupSignalLedger
    sig: int
    sender: int
    when: float


class GroupSignalLedger:
    """Which copies of ours a kill of the whole process group already delivered to CMD.

    The problem. ``kill -TERM -PGID`` (``kill %1``, ``fg``, ``kill 0`` from a descendant) puts
    one copy of the signal in CMD and one in vgpu-launch, with the same siginfo (``SI_USER``,
    the sender's pid) as a ``kill`` of vgpu-launch alone. CMD must get it once, so our copy may
    be forwarded only if CMD did not get its own. When the main thread (``Forwarder``) decides
    on a copy, CMD's twin, if any, is in exactly one of three places, and it looks in each:

    1. taken by CMD and seen by the tracer: an entry in this ledger (``take``);
    2. pending in CMD (``ShdPnd`` of /proc/CMD/status): not taken yet;
    3. taken by a thread of CMD that sits in the signal-delivery-stop the tracer has not dealt
       with yet. The main thread then waits (``wait``) until the tracer has dealt with every
       such stop (``owed_stop``): the tracer writes the entry before it lets the thread go on.
       There is no time limit: a tracer that is not scheduled for a while (a loaded host, a
       paused VM) delays the decision, it does not make it wrong.

    The kernel moves CMD's copy from 2 to 3 atomically (dequeue and ptrace stop under one
    lock), and from 3 to 1 only once the entry is written, so looking at 1, 2, 3, then 1 again
    cannot miss it.

    Entries (tracer thread, ``note``). The tracer calls ``note`` for every signal in
    ``GROUP_SIGNALS`` a thread of CMD takes from another process (``SI_USER``/``SI_QUEUE``,
    not from vgpu-launch: a forwarded ``kill`` carries our pid, a relayed ``sigqueue`` is
    recognised by ``relayed``). It writes an entry only if, at that moment, a copy of ours of
    the same signal is *being decided on* (the main thread's ``SignalWaiter`` buffer, filled
    by the kernel as it dequeues, cleared once the copy is settled) with the same sender, or
    is *pending* (our ``ShdPnd``). That is what makes the two copies one kill: a signal sent
    to CMD alone a moment before or after ours does not count. The kernel moves our copy from
    pending to the buffer between two looks, so the tracer looks at the buffer, the pending
    set, and the buffer again. Between the two the copy is in neither: sigwaitinfo dequeues it
    under the signal lock and copies it to the buffer only afterwards, on its way out, while
    the main thread runs. So when the tracer sees no copy while the main thread is running, it
    looks again (``IN_TRANSIT``) until the buffer shows one or the main thread waits again.
    Nor is our copy there yet while the sender is still in kill(-PGID): the kernel signals the
    group's members one after the other, newest first, so CMD before vgpu-launch, and a sender
    preempted in between lets CMD take its copy first. So while the sender of a ``kill`` is on
    a CPU (state R), the tracer looks again too (``KILL_IN_FLIGHT``), and the time our copy
    may spend in transit counts from the last moment the sender was seen running. Both limits
    are CPU time, so that a host too busy to run the sender, the main thread or the tracer
    itself does not end a look early; ``NOTE_LIMIT`` bounds it in wall time.

    Epochs. A standard signal has at most one copy pending and one being decided at a time, so
    the copies of one signal that the main thread decides on are numbered in order: copy
    ``settled[sig]`` is the one being decided, or the next to be. Each entry names the copy it
    explains: the one being decided (same sender), else the pending one (its sender is not
    known yet: the first kill's, if several merged). One entry per (copy, sender).

    Settling (main thread). ``take`` consumes the entry of the copy being decided, if there is
    one (the copy is not forwarded); else ``settle``, once decided. Either way the copy is
    settled: ``settled[sig]`` moves on, the buffer is cleared, and every entry for an earlier
    or this copy is dropped (one from another sender, or of kills that merged into this copy,
    has nothing left to explain). Both run under the ledger's lock, as ``note`` does: an
    entry is either written before the copy is settled, or it is for a later copy.

    ``forget``: sending a stop signal discards a pending SIGCONT, and SIGCONT discards pending
    stop signals. An entry noted for such a copy (before the signal now being decided was
    taken) never gets its copy, and would stand for the next one: it is dropped.

    Queued signals we pass on ourselves (``rt_sigqueueinfo`` keeps the original sender, so CMD
    taking one looks like a group kill) are remembered by ``relayed`` and recognised by
    ``note``.
    """

    def __init__(self, own_pid: int) -> None:
        self._pid = own_pid
        self._cond = threading.Condition()
        self._entries: list[_Entry] = []
        self._settled: dict[int, int] = collections.defaultdict(int)  # signal -> copies
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
        """Whether CMD took ``sig`` from ``sender`` while our copy of it being decided on was
        pending or being decided on: the same kill of the group. If so, the copy is settled."""
        with self._cond:
            epoch = self._settled[sig]
            for e in self._entries:
                if e.epoch == epoch and e.sig == sig and e.sender == sender:
                    self._advance(sig)
                    return True
        return False

    def settle(self, sig: int, sender: int) -> None:
        """The main thread has decided on its copy of ``sig`` (unless ``take`` settled it)."""
        with self._cond:
            waiter = self._waiter
            if waiter is not None and waiter.taken() == (sig, sender):
                self._advance(sig)

    def forget(self, sigs: frozenset[int]) -> None:
        """Drop entries for ``sigs`` noted before the signal being decided on was taken."""
        before = self._dequeued
        with self._cond:
            self._entries = [e for e in self._entries if e.sig not in sigs or e.when >= before]

    def relayed(self, info: SigInfo) -> None:
        """A queued signal is being passed on in its sender's name."""
        with self._cond:
            now = time.monotonic()
            while self._relayed and self._relayed[0][0] < now - RELAYED_TTL:
                self._relayed.popleft()
            self._relayed.append((now, info.signo, info.pid, info.value))

    def wait(self, timeout: float) -> None:
        """Until the tracer notes something, at most ``timeout`` seconds."""
        with self._cond:
            self._cond.wait(timeout)

    def _advance(self, sig: int) -> None:
        # With self._cond held: the copy being decided on is settled.
        epoch = self._settled[sig]
        self._settled[sig] = epoch + 1
        self._entries = [e for e in self._entries if e.sig != sig or e.epoch > epoch]
        if self._waiter is not None:
            self._waiter.done()

    # -- tracer thread --------------------------------------------------------------------

    def note(self, sig: int, info: SigInfo) -> bool:
        """CMD took ``sig`` (``info``: from another process): whether it is the twin of a
        copy of ours, now written down."""
        if info.code == SI_QUEUE:
            with self._cond:
                for relayed in self._relayed:
                    if relayed[1:] == (sig, info.pid, info.value):
                        self._relayed.remove(relayed)  # one we passed on
                        return False
        give_up = time.monotonic() + NOTE_LIMIT
        sender = _CpuClock(info.pid) if info.code == SI_USER else None
        main = _CpuClock(self._pid, self._pid)
        while True:
            # Looked at before the copies, so that a "no" means the copy was there to be seen.
            in_flight = sender is not None and sender.used() < KILL_IN_FLIGHT and sender.running
            if in_flight:
                main.restart()  # our copy is not sent yet: its way to the buffer is ahead
            in_transit = main.used() < IN_TRANSIT and main.running
            found = self._note(sig, info)
            if found is not None:
                return found
            if not (in_transit or in_flight) or time.monotonic() > give_up:
                return False
            time.sleep(0.0001)

    def _note(self, sig: int, info: SigInfo) -> bool | None:
        """One look (see note); None: no copy of ours in sight."""
        waiter = self._waiter
        with self._cond:
            before = waiter.taken() if waiter is not None else (0, 0)
            pending = sig in shared_pending(self._pid)
            after = waiter.taken() if waiter is not None else (0, 0)
            epoch = self._settled[sig]
            # The copies of ours that CMD's may be the twin of: (epoch, sender or None).
            copies: list[tuple[int, int | None]] = []
            if before[0] == sig:
                copies.append((epoch, before[1]))
                if pending:  # a later one
                    copies.append((epoch + 1, None))
            elif after[0] == sig:  # dequeued between the looks: the pending one, if any
                copies.append((epoch, after[1]))
            elif pending:
                copies.append((epoch, None))
            for n, sender in copies:
                if sender not in (None, info.pid):
                    continue
                if any(
                    e.epoch == n and e.sig == sig and e.sender == info.pid for e in self._entries
                ):
                    continue  # that copy is explained already
                if len(self._entries) >= 256:  # never more than a few: a bound, not a rule
                    del self._entries[0]
                self._entries.append(_Entry(n, sig, info.pid, time.monotonic()))
                self._cond.notify_all()
                return True
            return None if not copies else False


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
        # The tracer's set of threads parked in PTRACE_LISTEN (Tracer.parked), once it exists.
        self.parked: Collection[int] = frozenset()

    def on_signal(self, info: SigInfo) -> None:
        """Main thread, for each signal it takes (after ``ledger.began()``)."""
        sig = info.signo
        source = origin(info.code, info.pid, self.pid, self.cmd.pid)
        ledger = self.ledger
        if source == OWN:
            ledger.settle(sig, info.pid)
            return
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
            if not is_thread_of(cmd, tid):
                return  # a descendant, not a thread of CMD
            if sig == signal.SIGCONT:
                self.jobs.cmd_continued()
            info = getsiginfo(tid)
            if info.code > 0 or info.pid in (self.pid, cmd):
                return  # the kernel's, one we forwarded with kill, or CMD's own (never forwarded)
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
        the process group. Only a standard signal can tell (GroupSignalLedger gives the
        protocol). Forwarding a standard signal still pending in CMD would change nothing."""
        sig = info.signo
        ledger = self.ledger
        if ledger.take(sig, info.pid):
            return "CMD took it too (sent to the process group)"
        if sig >= signal.SIGRTMIN or not self.cmd.traced:
            return ""  # real-time signals queue: each one sent is one to deliver
        cmd = self.cmd.pid
        if not self._cmd_in_our_group():
            return ""
        while True:
            if ledger.take(sig, info.pid):
                return "CMD took it too (sent to the process group)"
            if sig in shared_pending(cmd):
                return "pending in CMD already (sent to the process group)"
            # Taken by a thread that waits for the tracer: the entry comes before it goes on.
            owed = sig in GROUP_SIGNALS and owed_stop(cmd, sig, self.parked)
            if ledger.take(sig, info.pid):
                return "CMD took it too (sent to the process group)"
            if not owed or not self.cmd.traced:
                return ""
            ledger.wait(POLL)

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
