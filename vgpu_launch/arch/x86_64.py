"""x86_64 tracer; x86_64 and i386 (compat) tracees.

A 64-bit tracer sees a 32-bit tracee's registers in the 64-bit ``user_regs_struct``; the code
segment selector tells them apart (0x23: 32-bit user code, 0x33: 64-bit).
"""

from __future__ import annotations

from .model import Abi, Arch

# Offsets in struct user_regs_struct (arch/x86/include/asm/user_64.h).
CS_OFFSET = 17 * 8
RSP_OFFSET = 19 * 8
USER32_CS = 0x23


def word_size(cs: int) -> int:
    return 4 if cs == USER32_CS else 8


# The register functions import python-ptrace when first called, not with this table: the
# tables are read on the way to the one-line message that says python-ptrace is missing.


def read_sp(tid: int) -> tuple[int, int]:
    from ..trace.ptracelib import peekuser

    sp = peekuser(tid, RSP_OFFSET)
    if sp >= 1 << 32:  # no 32-bit process has an address above 4 GiB: skip the second request
        return sp, 8
    return sp, word_size(peekuser(tid, CS_OFFSET))


def write_sp(tid: int, sp: int) -> None:
    from ..trace.ptracelib import pokeuser

    pokeuser(tid, RSP_OFFSET, sp)


ARCH = Arch(
    name="x86_64",
    aliases=("amd64",),
    native=Abi(
        word=8,
        name="x86_64",
        elf_machine=62,  # EM_X86_64
        loader="/lib64/ld-linux-x86-64.so.2",
        lib="lib/x86_64-linux-gnu",
        platform="x86_64",
        ptrace_syscall=101,
        audit_arch=0xC000003E,  # AUDIT_ARCH_X86_64
    ),
    compat=Abi(
        word=4,
        name="i386",
        elf_machine=3,  # EM_386
        loader="/lib/ld-linux.so.2",
        lib="lib/i386-linux-gnu",
        platform="i686",
        ptrace_syscall=26,
        audit_arch=0x40000003,  # AUDIT_ARCH_I386
    ),
    rt_sigqueueinfo=129,
    seccomp=317,
    read_sp=read_sp,
    write_sp=write_sp,
    # x32 programs run in the x86_64 audit architecture, their numbers with __X32_SYSCALL_BIT
    extra_ptrace_syscalls=((0xC000003E, 0x40000000 + 521),),
)
