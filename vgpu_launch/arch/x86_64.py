"""x86_64 tracer; x86_64 and i386 (compat) tracees.

A 64-bit tracer sees a 32-bit tracee's registers in the 64-bit ``user_regs_struct``; the code
segment selector tells them apart (0x23: 32-bit user code, 0x33: 64-bit).
"""

from __future__ import annotations

from ..trace.ptracelib import peekuser, pokeuser

# Offsets in struct user_regs_struct (arch/x86/include/asm/user_64.h).
CS_OFFSET = 17 * 8
RSP_OFFSET = 19 * 8
USER32_CS = 0x23


def word_size(cs: int) -> int:
    return 4 if cs == USER32_CS else 8


def read_sp(tid: int) -> tuple[int, int]:
    sp = peekuser(tid, RSP_OFFSET)
    if sp >= 1 << 32:  # no 32-bit process has an address above 4 GiB: skip the second request
        return sp, 8
    return sp, word_size(peekuser(tid, CS_OFFSET))


def write_sp(tid: int, sp: int) -> None:
    pokeuser(tid, RSP_OFFSET, sp)


# System calls, for the seccomp filter (trace/seccomp.py): the ptrace call of every ABI this
# machine runs, by audit architecture (seccomp_data.arch): x86_64 (and x32, whose numbers
# carry __X32_SYSCALL_BIT), i386.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
PTRACE_SYSCALLS: dict[int, tuple[int, ...]] = {
    AUDIT_ARCH_X86_64: (101, X32_SYSCALL_BIT + 521),
    AUDIT_ARCH_I386: (26,),
}
SYS_SECCOMP = 317
