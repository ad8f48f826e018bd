"""The only place that knows about machines: one frozen ``Arch`` value per machine.

An ``Arch`` (arch/model.py) holds the ELF machine numbers and names of its native and 32-bit
ABIs, their dynamic loaders and ld.so's ``$LIB``/``$PLATFORM``, the ptrace and
rt_sigqueueinfo syscall numbers and AUDIT_ARCH values, and the register access of a stopped
tracee (``read_sp``/``write_sp``). The rest of vgpu-launch never looks at registers, never names
a loader and never numbers a syscall.

The machine is chosen once, at import: ``NATIVE`` (None on a machine vgpu-launch does not
support, where the diagnostics still work) or ``current()`` (raises on such a machine). A new
machine is one more module like x86_64.py, listed in ``ALL``.
"""

from __future__ import annotations

import platform

from . import aarch64, x86_64
from .model import Abi, Arch

__all__ = [
    "ALL",
    "NATIVE",
    "Abi",
    "Arch",
    "UnsupportedMachine",
    "current",
    "for_machine",
    "machine_name",
    "native_abi",
]

ALL: tuple[Arch, ...] = (x86_64.ARCH, aarch64.ARCH)


class UnsupportedMachine(OSError):
    """vgpu-launch cannot trace programs on this machine."""


def for_machine(machine: str) -> Arch | None:
    """The machine called ``machine`` (``uname -m``), or None."""
    return next((a for a in ALL if machine == a.name or machine in a.aliases), None)


NATIVE: Arch | None = for_machine(platform.machine())


def current() -> Arch:
    """This machine; raises UnsupportedMachine where vgpu-launch cannot trace."""
    if NATIVE is None:
        names = " and ".join(a.name for a in ALL)
        raise UnsupportedMachine(
            f"unsupported machine type {platform.machine()!r} ({names} are supported)"
        )
    return NATIVE


def native_abi(word: int) -> Abi | None:
    """This machine's ABI for ``word``-byte programs; None on an unsupported machine."""
    return NATIVE.abi(word) if NATIVE is not None else None


def machine_name(elf_machine: int) -> str:
    """The name of an ELF machine number, for messages ("aarch64", "machine 243")."""
    for a in ALL:
        for abi in a.abis:
            if abi.elf_machine == elf_machine:
                return abi.name
    return f"machine {elf_machine}"
