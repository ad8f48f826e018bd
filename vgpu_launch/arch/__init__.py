"""Per-architecture register access: the stack pointer and word size of a stopped tracee.

Each module provides ``read_sp(tid) -> (sp, word)`` and ``write_sp(tid, sp)``; the rest of
vgpu-launch never looks at registers. It also names the system calls the seccomp filter
(trace/seccomp.py) watches: ``PTRACE_SYSCALLS`` (audit architecture -> ptrace's numbers) and
``SYS_SECCOMP``.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from types import ModuleType


def _select(machine: str) -> ModuleType:
    if machine in ("x86_64", "amd64"):
        from . import x86_64

        return x86_64
    if machine in ("aarch64", "arm64"):
        from . import aarch64

        return aarch64
    raise OSError(f"unsupported machine type {machine!r} (x86_64 and aarch64 are supported)")


_mod = _select(platform.machine())
read_sp: Callable[[int], tuple[int, int]] = _mod.read_sp
write_sp: Callable[[int, int], None] = _mod.write_sp
PTRACE_SYSCALLS: dict[int, tuple[int, ...]] = _mod.PTRACE_SYSCALLS
SYS_SECCOMP: int = _mod.SYS_SECCOMP
