"""libc plumbing for signals: the whole ``siginfo_t``, in and out.

Python's ``signal.sigwaitinfo`` drops the upper half of a queued pointer value, and the standard
library has no ``rt_sigqueueinfo`` nor ``PTRACE_GETSIGINFO``. The main thread takes signals with
``SignalWaiter`` (``sigwaitinfo`` through libc, into a buffer another thread may look at); a
signal sent with ``sigqueue`` is passed on with ``rt_sigqueueinfo`` and that same ``siginfo_t``,
so CMD sees the original sender's pid and uid and the full value, as if it had been sent to CMD
directly. Which signals go where is forwarding.py's business.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from . import arch
from .trace.ptracelib import ptrace

SI_USER = 0
SI_KERNEL = 0x80
SI_QUEUE = -1
SI_TKILL = -6

_SIGINFO_SIZE = 128
_WORD = ctypes.sizeof(ctypes.c_void_p)
# siginfo_t: si_signo, si_errno, si_code, then the union, aligned to a pointer.
_UNION = 16 if _WORD == 8 else 12
_RT_SIGQUEUEINFO = arch.NATIVE.rt_sigqueueinfo if arch.NATIVE is not None else None
_PTRACE_GETSIGINFO = 0x4202

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class SigInfo:
    signo: int
    code: int
    pid: int
    uid: int
    value: int  # sival, as an unsigned machine word (SI_QUEUE)
    raw: bytes  # the whole siginfo_t, as the kernel filled it in


class _SigSet(ctypes.Structure):
    _fields_ = [("val", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]


def parse_siginfo(raw: bytes) -> SigInfo:
    signo, _errno, code = (int.from_bytes(raw[i : i + 4], "little", signed=True) for i in (0, 4, 8))
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
        return (
            int.from_bytes(head[0:4], "little"),
            int.from_bytes(head[_UNION : _UNION + 4], "little", signed=True),
        )


def send(pid: int, info: SigInfo) -> None:
    """Pass ``info`` on to ``pid``: ``rt_sigqueueinfo`` for a queued signal (sender and value
    kept), ``kill`` for anything else (CMD sees vgpu-launch as the sender, SI_USER).
    Raises ProcessLookupError when ``pid`` is gone."""
    if info.code == SI_QUEUE:
        buf = ctypes.create_string_buffer(info.raw, _SIGINFO_SIZE)
        if _RT_SIGQUEUEINFO is not None:
            r = _libc.syscall(
                ctypes.c_long(_RT_SIGQUEUEINFO), ctypes.c_int(pid), ctypes.c_int(info.signo), buf
            )
        else:
            r = _libc.sigqueue(
                ctypes.c_int(pid), ctypes.c_int(info.signo), ctypes.c_void_p(info.value)
            )
        if r == 0:
            return
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise ProcessLookupError(err, os.strerror(err))
        # EPERM or ENOSYS (a seccomp profile): a plain signal is better than none
    os.kill(pid, info.signo)


def getsiginfo(tid: int) -> SigInfo:
    """PTRACE_GETSIGINFO (tracer thread only): the signal a tracee is stopped for."""
    buf = ctypes.create_string_buffer(_SIGINFO_SIZE)
    ptrace(_PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return parse_siginfo(buf.raw)
