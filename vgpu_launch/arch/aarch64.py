"""aarch64 tracer; aarch64 and AArch32 (compat) tracees.

No PEEKUSER on arm64: registers come as the NT_PRSTATUS regset. For a 64-bit tracee that is
``struct user_pt_regs`` (x0-x30, sp, pc, pstate); for an AArch32 tracee the kernel returns the
compat view, 18 32-bit words with sp in r13. The regset's length tells which.
"""

from __future__ import annotations

import struct

from ..trace.ptracelib import getregset, setregset

PRSTATUS64_SIZE = 34 * 8
PRSTATUS32_SIZE = 18 * 4
SP64_OFFSET = 31 * 8
SP32_OFFSET = 13 * 4


def sp_from_prstatus(regs: bytes) -> tuple[int, int]:
    """(stack pointer, word size) from an NT_PRSTATUS regset."""
    if len(regs) == PRSTATUS32_SIZE:
        return struct.unpack_from("<I", regs, SP32_OFFSET)[0], 4
    if len(regs) >= SP64_OFFSET + 8:
        return struct.unpack_from("<Q", regs, SP64_OFFSET)[0], 8
    raise OSError(f"unexpected NT_PRSTATUS size {len(regs)}")


def prstatus_with_sp(regs: bytes, sp: int) -> bytes:
    out = bytearray(regs)
    if len(regs) == PRSTATUS32_SIZE:
        struct.pack_into("<I", out, SP32_OFFSET, sp)
    else:
        struct.pack_into("<Q", out, SP64_OFFSET, sp)
    return bytes(out)


def read_sp(tid: int) -> tuple[int, int]:
    return sp_from_prstatus(getregset(tid, PRSTATUS64_SIZE))


def write_sp(tid: int, sp: int) -> None:
    setregset(tid, prstatus_with_sp(getregset(tid, PRSTATUS64_SIZE), sp))


# System calls, for the seccomp filter (trace/seccomp.py): the ptrace call of every ABI this
# machine runs, by audit architecture (seccomp_data.arch): AArch64, AArch32.
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028
PTRACE_SYSCALLS: dict[int, tuple[int, ...]] = {
    AUDIT_ARCH_AARCH64: (117,),
    AUDIT_ARCH_ARM: (26,),
}
SYS_SECCOMP = 277
