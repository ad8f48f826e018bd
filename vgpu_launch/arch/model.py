"""What vgpu-launch knows about one machine: the types that arch/x86_64.py and arch/aarch64.py
fill in. Data only; nothing here touches a process."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Abi:
    """One word size a machine runs programs of: its native ABI or its 32-bit compat ABI."""

    word: int  # bytes in a pointer: 8 or 4
    name: str  # the ELF machine's usual name ("x86_64", "i386")
    elf_machine: int  # e_machine of its programs and libraries
    loader: str  # glibc's dynamic loader for it
    lib: str  # ld.so's $LIB, for when the loader cannot be asked
    platform: str  # ld.so's $PLATFORM, likewise
    ptrace_syscall: int  # the ptrace syscall number a program of this ABI uses
    audit_arch: int  # AUDIT_ARCH_* as a seccomp filter sees it (seccomp_data.arch)


@dataclass(frozen=True)
class Arch:
    """One machine vgpu-launch runs on: both ABIs, its syscall numbers, its registers."""

    name: str  # uname -m
    aliases: tuple[str, ...]  # other spellings of the machine name
    native: Abi
    compat: Abi
    rt_sigqueueinfo: int  # syscall number, for the tracer's (native) process
    seccomp: int  # the seccomp syscall number (native), to install the ptrace filter
    # (stack pointer, word size) of a tracee stopped at its exec event; and moving it
    read_sp: Callable[[int], tuple[int, int]]
    write_sp: Callable[[int, int], None]
    # ptrace's numbers in ABIs beyond the two (x86_64's x32), by audit architecture
    extra_ptrace_syscalls: tuple[tuple[int, int], ...] = ()

    @property
    def abis(self) -> tuple[Abi, Abi]:
        return self.native, self.compat

    def abi(self, word: int) -> Abi | None:
        """The ABI of ``word``-byte programs on this machine; None for any other size."""
        return next((a for a in self.abis if a.word == word), None)

    @property
    def ptrace_syscalls(self) -> dict[int, tuple[int, ...]]:
        """For the seccomp filter (trace/seccomp.py): the ptrace call of every ABI this
        machine runs, by audit architecture (seccomp_data.arch)."""
        out: dict[int, tuple[int, ...]] = {a.audit_arch: (a.ptrace_syscall,) for a in self.abis}
        for audit, nr in self.extra_ptrace_syscalls:
            out[audit] = (*out.get(audit, ()), nr)
        return out

    def word_of_loader(self, path: str) -> int | None:
        """The word size of programs that ``path`` (a mapped dynamic loader) serves."""
        base = os.path.basename(path)
        return next((a.word for a in self.abis if os.path.basename(a.loader) == base), None)
