"""The ptrace requests vgpu-launch uses, on python-ptrace's low-level binding.

python-ptrace's binding lacks the PTRACE_SEIZE family; they are plain request numbers.
Every call raises ``PtraceError`` (with ``.errno``) on failure; ESRCH is normal (the thread
died between ``waitpid`` and the request) and is the caller's to ignore.
"""

from __future__ import annotations

import ctypes
import errno
import re

from ptrace.binding import func as _func
from ptrace.error import PtraceError

__all__ = ["PtraceError", "ptrace"]

_ERRNO_IN_MESSAGE = re.compile(r"error #(\d+)")


def ptrace(request: int, pid: int, arg1: int = 0, arg2: int = 0, check_errno: bool = False) -> int:
    """python-ptrace's ``ptrace()``, with ``PtraceError.errno`` always set.

    Where python-ptrace uses its C extension (Debian's package does), the error's ``errno`` is
    read from ctypes' private copy, which that extension never sets: it is 0, and the real
    value is only in the message ("... error #3: No such process").
    """
    try:
        return int(_func.ptrace(request, pid, arg1, arg2, check_errno))
    except PtraceError as exc:
        if not exc.errno:
            found = _ERRNO_IN_MESSAGE.search(str(exc))
            exc.errno = int(found.group(1)) if found else 0
        raise


PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_PEEKUSER = 3
PTRACE_POKEUSER = 6
PTRACE_DETACH = 17
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128

NT_PRSTATUS = 1

# waitpid flag: wait for every child, clones and tracees included (__WALL)
WALL = 0x40000000

FOLLOW = PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC


def seize(pid: int, options: int) -> None:
    ptrace(PTRACE_SEIZE, pid, 0, options)


def try_seize(pid: int, options: int) -> int:
    """PTRACE_SEIZE that reports instead of raising: 0, or the error number (EPERM where
    the kernel's answer cannot be told)."""
    try:
        seize(pid, options)
    except PtraceError as exc:
        return exc.errno or errno.EPERM
    return 0


def cont(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_CONT, tid, 0, sig)


def listen(tid: int) -> None:
    ptrace(PTRACE_LISTEN, tid, 0, 0)


def geteventmsg(tid: int) -> int:
    # An unsigned long, not the 4-byte value python-ptrace's helper reads.
    msg = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return msg.value


WORD = ctypes.sizeof(ctypes.c_long)  # what PEEKDATA/POKEDATA move: the tracer's word
_WORD_MASK = (1 << (8 * WORD)) - 1


def peekdata(tid: int, addr: int) -> bytes:
    """One word of the tracee's memory at ``addr``, as bytes in memory order."""
    value = ptrace(PTRACE_PEEKDATA, tid, addr, 0, check_errno=True)
    return (value & _WORD_MASK).to_bytes(WORD, "little")


def pokedata(tid: int, addr: int, data: bytes) -> None:
    """Write one word (``WORD`` bytes, in memory order) at ``addr``."""
    ptrace(PTRACE_POKEDATA, tid, addr, int.from_bytes(data, "little"))


def peekuser(tid: int, offset: int) -> int:
    return ptrace(PTRACE_PEEKUSER, tid, offset, 0, check_errno=True)


def pokeuser(tid: int, offset: int, value: int) -> None:
    ptrace(PTRACE_POKEUSER, tid, offset, value)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def getregset(tid: int, size: int, note: int = NT_PRSTATUS) -> bytes:
    """The register set, as many bytes as the kernel filled in (less for a compat tracee)."""
    buf = ctypes.create_string_buffer(size)
    iov = _IoVec(ctypes.cast(buf, ctypes.c_void_p), size)
    ptrace(PTRACE_GETREGSET, tid, note, ctypes.addressof(iov))
    return buf.raw[: iov.len]


def setregset(tid: int, data: bytes, note: int = NT_PRSTATUS) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    iov = _IoVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    ptrace(PTRACE_SETREGSET, tid, note, ctypes.addressof(iov))
