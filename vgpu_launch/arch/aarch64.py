"""aarch64 tracer; aarch64 and AArch32 (compat) tracees.

No PEEKUSER on arm64: registers come as the NT_PRSTATUS regset. For a 64-bit tracee that is
``struct user_pt_regs`` (x0-x30, sp, pc, pstate); for an AArch32 tracee the kernel returns the
compat view, 18 32-bit words with sp in r13. The regset's length tells which.
"""

from __future__ import annotations

import struct

from .model import Abi, Arch

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


# The register functions import python-ptrace when first called (see x86_64.py).


def read_sp(tid: int) -> tuple[int, int]:
    from ..trace.ptracelib import getregset

    return sp_from_prstatus(getregset(tid, PRSTATUS64_SIZE))


def write_sp(tid: int, sp: int) -> None:
    from ..trace.ptracelib import getregset, setregset

    setregset(tid, prstatus_with_sp(getregset(tid, PRSTATUS64_SIZE), sp))


ARCH = Arch(
    name="aarch64",
    aliases=("arm64",),
    native=Abi(
        word=8,
        name="aarch64",
        elf_machine=183,  # EM_AARCH64
        loader="/lib/ld-linux-aarch64.so.1",
        lib="lib/aarch64-linux-gnu",
        platform="aarch64",
        ptrace_syscall=117,
        audit_arch=0xC00000B7,  # AUDIT_ARCH_AARCH64
    ),
    compat=Abi(
        word=4,
        name="arm",
        elf_machine=40,  # EM_ARM
        loader="/lib/ld-linux-armhf.so.3",
        lib="lib/arm-linux-gnueabihf",
        platform="v7l",
        ptrace_syscall=26,  # EABI
        audit_arch=0x40000028,  # AUDIT_ARCH_ARM
    ),
    rt_sigqueueinfo=138,
    seccomp=277,
    read_sp=read_sp,
    write_sp=write_sp,
)
