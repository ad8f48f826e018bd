"""The seccomp filter that hands the tree's ptrace requests to vgpu-launch.

A process of the tree that calls ``ptrace(PTRACE_TRACEME)``, ``PTRACE_ATTACH`` or
``PTRACE_SEIZE`` (strace or gdb run by the tree, LeakSanitizer, a crash reporter) would get
EPERM: vgpu-launch already traces it or its target. CMD is started with a filter that sends
these three requests, and only these, to a listener that vgpu-launch holds
(``SECCOMP_RET_USER_NOTIF``): vgpu-launch gives up the process concerned, then lets the call
proceed (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``). Every other system call, and every other
ptrace request (a debugger's PEEK/CONT/GETREGS on its own tracees), is allowed by the filter
without leaving the kernel.

Why a listener and not ``SECCOMP_RET_TRACE``: RET_TRACE stops the caller for its tracer, and
a caller without a tracer gets ENOSYS. LeakSanitizer attaches from a helper created with
``CLONE_UNTRACED``, which no tracer follows, and a process that was released has no tracer:
both would get ENOSYS. A listener answers any caller of the tree, traced or not.

The filter is inherited by every descendant and can never be removed. Once vgpu-launch has
exited (or died) its listener is gone, and these three requests fail with ENOSYS in the
processes it leaves behind (docs/launcher.md).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

from .. import arch

# linux/seccomp.h, linux/filter.h, linux/audit.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif): 80 bytes
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp): 24 bytes
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102

PTRACE_TRACEME = 0
PTRACE_ATTACH = 16
PTRACE_SEIZE = 0x4206
HANDED_OVER = {PTRACE_TRACEME: "traceme", PTRACE_ATTACH: "attach", PTRACE_SEIZE: "seize"}

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_NR, _ARCH, _ARG0_LO, _ARG0_HI = 0, 4, 16, 20
# struct sock_filter opcodes
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K


def _insn(code: int, jt: int = 0, jf: int = 0, k: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(syscalls: dict[int, tuple[int, ...]]) -> bytes:
    """The BPF program: USER_NOTIF for ptrace(TRACEME | ATTACH | SEIZE) under every audit
    architecture in ``syscalls`` (audit arch -> its ptrace system call numbers); ALLOW for
    anything else, including every system call of an architecture not listed."""
    # (opcode, k, label if true, label if false); a label names the next instruction.
    code: list[tuple[int, int, str, str]] = [(_LD_W_ABS, _ARCH, "", "")]
    code += [(_JEQ_K, audit, f"arch{i}", "") for i, audit in enumerate(syscalls)]
    code.append((_RET_K, SECCOMP_RET_ALLOW, "", ""))
    labels: dict[str, int] = {}
    for i, nrs in enumerate(syscalls.values()):
        labels[f"arch{i}"] = len(code)
        code.append((_LD_W_ABS, _NR, "", ""))
        code += [(_JEQ_K, nr, "request", "") for nr in nrs]
        code.append((_RET_K, SECCOMP_RET_ALLOW, "", ""))
    # The request is args[0], an unsigned long: a value with high bits set is no request the
    # kernel knows, and is left to the kernel.
    labels["request"] = len(code)
    code += [(_LD_W_ABS, _ARG0_HI, "", ""), (_JEQ_K, 0, "", "allow"), (_LD_W_ABS, _ARG0_LO, "", "")]
    code += [(_JEQ_K, req, "notify", "") for req in sorted(HANDED_OVER)]
    labels["allow"] = len(code)
    code.append((_RET_K, SECCOMP_RET_ALLOW, "", ""))
    labels["notify"] = len(code)
    code.append((_RET_K, SECCOMP_RET_USER_NOTIF, "", ""))

    def jump(at: int, label: str) -> int:
        return labels[label] - at - 1 if label else 0

    return b"".join(
        _insn(op, jump(at, jt), jump(at, jf), k) for at, (op, k, jt, jf) in enumerate(code)
    )


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _SeccompData(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_int),
        ("arch", ctypes.c_uint32),
        ("ip", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    ]


class _Notif(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("data", _SeccompData),
    ]


class _NotifResp(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("val", ctypes.c_int64),
        ("error", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def install() -> int:
    """Install the filter in this (single-threaded, about to exec) process; return the
    listener's descriptor. Raises OSError: EACCES without CAP_SYS_ADMIN and without
    no_new_privs (never set here: it would change what setuid programs can do)."""
    code = filter_program(arch.current().ptrace_syscalls)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    fd = _libc.syscall(
        ctypes.c_long(arch.current().seccomp),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER),
        ctypes.byref(prog),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def why_not(err: int) -> str:
    """Why the filter could not be installed, in the operator's words."""
    if err == errno.EACCES:
        return (
            "vgpu-launch has neither CAP_SYS_ADMIN nor no_new_privs; it does not set "
            "no_new_privs itself (that would change what setuid programs can do)"
        )
    if err == errno.EINVAL:
        return "this kernel has no seccomp user notification (Linux 5.0; 5.5 to continue calls)"
    if err == errno.EBUSY:
        return (
            "this process already inherits a seccomp listener (the kernel allows one per "
            "process): an outer vgpu-launch, or a sandbox that uses one"
        )
    if err == errno.EPERM:
        return (
            "a seccomp filter already in place (a unit's SystemCallFilter=, a container's "
            "profile) forbids the seccomp system call"
        )
    return f"seccomp refused ({errno.errorcode.get(err, err)}: {os.strerror(err)})"


def probe() -> str | None:
    """Before CMD is started: why the filter cannot be installed, or None if it can.

    Where a seccomp filter is in place already (a unit's SystemCallFilter=, a container's
    profile), the seccomp system call itself may be refused, or may kill the caller with
    SIGSYS (systemd's default action): try it in a throwaway child first, so that CMD's child
    never dies of it."""
    from .. import procfs

    if procfs.status_field("self", "Seccomp") in (None, "0"):
        return None
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(install())
        except OSError as exc:
            code = exc.errno or errno.EINVAL
        finally:
            os._exit(code & 0xFF)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return (
            f"a seccomp filter already in place (a unit's SystemCallFilter=, a container's "
            f"profile) kills the seccomp system call (signal {os.WTERMSIG(status)})"
        )
    code = os.WEXITSTATUS(status)
    return why_not(code) if code else None


# -- handing the listener from CMD's child to vgpu-launch ---------------------------------------


def hand_over(sock: socket.socket) -> None:
    """In CMD's child, before its exec: install the filter and send the listener (or errno)."""
    try:
        fd = install()
    except OSError as exc:
        sock.sendall(struct.pack("=i", exc.errno or errno.EINVAL))
        return
    try:
        socket.send_fds(sock, [struct.pack("=i", 0)], [fd])
    finally:
        os.close(fd)


def take_over(sock: socket.socket) -> tuple[int | None, int]:
    """In vgpu-launch: (the listener's descriptor, 0) or (None, errno). (None, 0): CMD's child
    ended before it got that far."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, 4, 1)
    except OSError as exc:
        return None, exc.errno or errno.EIO
    if len(data) < 4:
        for fd in fds:
            os.close(fd)
        return None, 0
    (err,) = struct.unpack("=i", data[:4])
    if err or not fds:
        for fd in fds:
            os.close(fd)
        return None, err or errno.EIO
    os.set_inheritable(fds[0], False)
    return fds[0], 0


# -- the listener --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One ptrace call of the tree, held in the kernel until answered."""

    id: int
    pid: int  # the caller's thread id
    arch: int
    nr: int
    args: tuple[int, ...]

    @property
    def request(self) -> int:
        return self.args[0]

    @property
    def target(self) -> int:
        """The thread id an ATTACH/SEIZE names (a pid_t: the low 32 bits, signed)."""
        low = self.args[1] & 0xFFFFFFFF
        return low - (1 << 32) if low & 0x80000000 else low


def receive(listener: int) -> Request:
    """Block until a call arrives. Raises OSError (ENOENT: the caller was gone before it could
    be read: take the next one)."""
    while True:
        notif = _Notif()
        if _libc.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, ctypes.byref(notif)) == 0:
            d = notif.data
            return Request(notif.id, notif.pid, d.arch, d.nr, tuple(d.args))
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def answer(listener: int, req: Request, error: int = 0) -> bool:
    """Let the call proceed (``error`` 0) or fail it with ``error``. False: the caller is gone
    or was interrupted (it will call again)."""
    resp = _NotifResp(
        req.id, 0, -error if error else 0, 0 if error else SECCOMP_USER_NOTIF_FLAG_CONTINUE
    )
    if _libc.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(resp)) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        return False
    raise OSError(err, os.strerror(err))
