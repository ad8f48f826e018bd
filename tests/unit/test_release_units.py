"""The pieces of release on their own: the seccomp filter in a real process, the matching of
release_after_exec, the new options."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct

import pytest

from vgpu_launch import arch
from vgpu_launch.cli import split_command
from vgpu_launch.config import load
from vgpu_launch.errors import ConfigError
from vgpu_launch.trace import seccomp
from vgpu_launch.trace.release import after_exec_match, after_exec_subject

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PTRACE_PEEKUSER = 3


def _raw_ptrace(request: int, pid: int) -> int:
    """ptrace(2) as a raw system call: the errno, 0 on success."""
    nr = arch.current().native.ptrace_syscall
    r = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(request), ctypes.c_long(pid), 0, 0)
    return ctypes.get_errno() if r < 0 else 0


@pytest.mark.skipif(os.geteuid() != 0, reason="installing the filter needs CAP_SYS_ADMIN")
def test_filter_holds_only_traceme_attach_and_seize() -> None:
    """Only PTRACE_TRACEME, PTRACE_ATTACH and PTRACE_SEIZE reach the listener; other ptrace
    requests (a debugger's own work) and a request with high bits set go straight to the
    kernel; the listener's answer is what the caller gets."""
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            ours.close()
            seccomp.hand_over(theirs)
            results = [
                _raw_ptrace(PTRACE_PEEKUSER, os.getppid()),  # not held: ESRCH (not traced)
                _raw_ptrace(seccomp.PTRACE_SEIZE | (1 << 32), 1),  # not held: ESRCH
                _raw_ptrace(seccomp.PTRACE_ATTACH, 1),  # held, answered EPERM
                _raw_ptrace(seccomp.PTRACE_SEIZE, 1),  # held, answered EACCES
                _raw_ptrace(seccomp.PTRACE_TRACEME, 0),  # held, let through: succeeds
            ]
            theirs.sendall(struct.pack("=5i", *results))
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    listener, err = seccomp.take_over(ours)
    assert listener is not None, os.strerror(err)
    try:
        seen = []
        for answer in (errno.EPERM, errno.EACCES, 0):
            ready = select.select([listener], [], [], 30)[0]
            assert ready, "no call reached the listener"
            req = seccomp.receive(listener)
            seen.append((req.request, req.target, req.pid))
            syscalls = arch.current().ptrace_syscalls
            assert req.arch in syscalls and req.nr in syscalls[req.arch]
            assert seccomp.answer(listener, req, answer)
        assert seen == [
            (seccomp.PTRACE_ATTACH, 1, child),
            (seccomp.PTRACE_SEIZE, 1, child),
            (seccomp.PTRACE_TRACEME, 0, child),
        ]
        data = b""
        while len(data) < 20:
            chunk = ours.recv(20 - len(data))
            assert chunk, "the child ended early"
            data += chunk
        assert struct.unpack("=5i", data) == (
            errno.ESRCH,
            errno.ESRCH,
            errno.EPERM,
            errno.EACCES,
            0,
        )
    finally:
        os.close(listener)
        ours.close()
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_filter_covers_every_abi_of_this_machine() -> None:
    """x86_64 lists x86_64 (and x32) and i386; aarch64 lists AArch64 and AArch32."""
    from vgpu_launch.arch import aarch64, x86_64

    assert x86_64.ARCH.ptrace_syscalls == {0xC000003E: (101, 0x40000000 + 521), 0x40000003: (26,)}
    assert aarch64.ARCH.ptrace_syscalls == {0xC00000B7: (117,), 0x40000028: (26,)}
    # every instruction is 8 bytes; the last two return USER_NOTIF and ALLOW
    code = seccomp.filter_program(x86_64.ARCH.ptrace_syscalls)
    assert len(code) % 8 == 0
    assert struct.unpack_from("=HBBI", code, len(code) - 8)[3] == seccomp.SECCOMP_RET_USER_NOTIF


@pytest.mark.parametrize(
    ("pattern", "exe", "argv", "match"),
    [
        ("/usr/bin/ollama runner*", "/usr/bin/ollama", ["ollama", "runner", "--port", "1"], True),
        ("/usr/bin/ollama runner*", "/usr/bin/ollama", ["ollama", "serve"], False),
        ("/usr/bin/ollama runner", "/usr/bin/ollama", ["ollama", "runner", "-x"], False),
        ("*/ollama runner *", "/opt/o/bin/ollama", ["./ollama", "runner", "-x"], True),
        ("/usr/bin/python3* worker.py", "/usr/bin/python3.11", ["python3", "worker.py"], True),
        ("worker", "/usr/bin/worker", ["worker"], False),  # the path is absolute
        ("*/worker", "/usr/bin/worker", ["anything-as-argv0"], True),  # argv[0] is not used
    ],
)
def test_after_exec_matching(pattern: str, exe: str, argv: list[str], match: bool) -> None:
    """The glob sees the real path then argv[1:], joined by spaces; '*' crosses '/' and ' '."""
    assert (after_exec_match([pattern], exe, argv) == pattern) is match, after_exec_subject(
        exe, argv
    )


def test_options() -> None:
    """--release-after-exec takes a value (CMD starts after it); the file and the environment
    give lists; strict mode refuses release_after_exec."""
    assert split_command(["--release-after-exec", "x *", "prog", "-a"]) == (
        ["--release-after-exec", "x *"],
        ["prog", "-a"],
    )
    cfg = load({"release_after_exec": ["a b*"], "strict_allow_release": True}, {})
    assert cfg.release_after_exec == ["a b*"] and cfg.strict_allow_release is True
    cfg = load(
        {},
        {"VGPU_LAUNCH_RELEASE_AFTER_EXEC": " a b* ;; c ", "VGPU_LAUNCH_STRICT_ALLOW_RELEASE": "1"},
    )
    assert cfg.release_after_exec == ["a b*", "c"] and cfg.strict_allow_release is True
    with pytest.raises(ConfigError, match="release_after_exec"):
        load({"strict": True, "release_after_exec": ["x"]}, {})
    with pytest.raises(ConfigError, match="list of patterns"):
        load({"release_after_exec": [1]}, {})
