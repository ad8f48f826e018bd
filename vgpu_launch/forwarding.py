"""Which signals vgpu-launch passes on to CMD, and how (docs/launcher.md gives every choice).

The main thread blocks every signal in ``FORWARDED`` and takes them one at a time with
``sigwaitinfo``, through libc so that the whole ``siginfo_t`` comes back (Python's
``signal.sigwaitinfo`` drops the upper half of a queued pointer value). A signal sent with
``sigqueue`` is passed on with ``rt_sigqueueinfo`` and that same ``siginfo_t``: CMD sees the
original sender's pid and uid and the full value, as if it had been sent to CMD directly.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from dataclasses import dataclass

from . import arch

# /proc readers the signal de-duplication uses; they live in procfs.py
from .procfs import in_ptrace_stop as in_ptrace_stop
from .procfs import shared_pending as shared_pending

SI_USER = 0
SI_KERNEL = 0x80
SI_QUEUE = -1
SI_TKILL = -6

# Never forwarded: SIGCHLD is about vgpu-launch's own children; SIGKILL/SIGSTOP can't be caught.
NOT_FORWARDED = frozenset({signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP})
# Sent by the tracer thread to wake the main thread (thread-directed, from our own pid).
WAKE = signal.SIGRTMAX
# 32 and 33 are glibc's own (thread cancellation, setxid); Python's SIGRTMIN is 34.
FORWARDED = frozenset(range(1, signal.NSIG)) - NOT_FORWARDED - {32, 33}

STOP_SIGNALS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
# What the kernel sends to a whole process group on behalf of a terminal: keys (INT, QUIT,
# TSTP), window size (WINCH), background access (TTIN, TTOU), hang-up (HUP, CONT; to the
# session leader only) and orphaned process groups (HUP, CONT).
TERMINAL_SIGNALS = frozenset(
    {signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGWINCH, signal.SIGTTIN,
     signal.SIGTTOU, signal.SIGHUP, signal.SIGCONT}
)
# Signals a shell or a service manager sends to whole process groups (`kill %1`, `fg`, `bg`,
# `kill 0`): CMD's tracer notes every one CMD takes, so that one that reached both vgpu-launch
# and CMD is not forwarded a second time. High-rate signals (SIGURG for Go's preemption,
# profiling timers) stay off this list: the tracer's hot path does not stop for them.
GROUP_SIGNALS = frozenset(
    {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT, signal.SIGUSR1,
     signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN,
     signal.SIGTTOU, signal.SIGWINCH, signal.SIGPWR}
)


@dataclass(frozen=True)
class SigInfo:
    signo: int
    code: int
    pid: int
    uid: int
    value: int  # sival, as an unsigned machine word (SI_QUEUE)
    raw: bytes  # the whole siginfo_t, as the kernel filled it in


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


# -- libc: sigwaitinfo with the whole siginfo_t, rt_sigqueueinfo --------------------------------

_SIGINFO_SIZE = 128
_WORD = ctypes.sizeof(ctypes.c_void_p)
# siginfo_t: si_signo, si_errno, si_code, then the union, aligned to a pointer.
_UNION = 16 if _WORD == 8 else 12
_RT_SIGQUEUEINFO = arch.NATIVE.rt_sigqueueinfo if arch.NATIVE is not None else None

_libc = ctypes.CDLL(None, use_errno=True)


class _SigSet(ctypes.Structure):
    _fields_ = [("val", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]


def parse_siginfo(raw: bytes) -> SigInfo:
    signo, _errno, code = (int.from_bytes(raw[i : i + 4], "little", signed=True)
                           for i in (0, 4, 8))
    pid = int.from_bytes(raw[_UNION : _UNION + 4], "little", signed=True)
    uid = int.from_bytes(raw[_UNION + 4 : _UNION + 8], "little")
    value = int.from_bytes(raw[_UNION + 8 : _UNION + 8 + _WORD], "little")
    return SigInfo(signo, code, pid, uid, value, raw)


class SignalWaiter:
    """``sigwaitinfo`` on a fixed set of (blocked) signals.

    The kernel writes the siginfo into the buffer as it dequeues the signal; the buffer is
    cleared when the caller is done with that signal (``done()``) and when the next wait begins:
    ``taken()`` tells another thread which signal the waiting thread has taken and is still
    handling (even before that thread runs again).
    """

    def __init__(self, signals: frozenset[int] | set[int]) -> None:
        self._set = _SigSet()
        _libc.sigemptyset(ctypes.byref(self._set))
        for sig in signals:
            _libc.sigaddset(ctypes.byref(self._set), sig)
        self._buf = ctypes.create_string_buffer(_SIGINFO_SIZE)

    def wait(self) -> SigInfo:
        while True:
            ctypes.memset(self._buf, 0, _SIGINFO_SIZE)
            if _libc.sigwaitinfo(ctypes.byref(self._set), self._buf) > 0:
                return parse_siginfo(self._buf.raw)
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))

    def done(self) -> None:
        ctypes.memset(self._buf, 0, _SIGINFO_SIZE)

    def taken(self) -> tuple[int, int]:
        """(signal, sender) of the signal the waiting thread has taken, (0, 0) while waiting."""
        head = ctypes.string_at(self._buf, _UNION + 4)
        return (int.from_bytes(head[0:4], "little"),
                int.from_bytes(head[_UNION : _UNION + 4], "little", signed=True))


def send(pid: int, info: SigInfo) -> None:
    """Pass ``info`` on to ``pid``: ``rt_sigqueueinfo`` for a queued signal (sender and value
    kept), ``kill`` for anything else (CMD sees vgpu-launch as the sender, SI_USER).
    Raises ProcessLookupError when ``pid`` is gone."""
    if info.code == SI_QUEUE:
        buf = ctypes.create_string_buffer(info.raw, _SIGINFO_SIZE)
        if _RT_SIGQUEUEINFO is not None:
            r = _libc.syscall(ctypes.c_long(_RT_SIGQUEUEINFO), ctypes.c_int(pid),
                              ctypes.c_int(info.signo), buf)
        else:
            r = _libc.sigqueue(ctypes.c_int(pid), ctypes.c_int(info.signo),
                               ctypes.c_void_p(info.value))
        if r == 0:
            return
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise ProcessLookupError(err, os.strerror(err))
        # EPERM or ENOSYS (a seccomp profile): a plain signal is better than none
    os.kill(pid, info.signo)
