"""The architecture seam: aarch64 register access (which no machine here can run: the
NT_PRSTATUS layouts), and each machine's table checked against what gcc builds here."""

from __future__ import annotations

import struct
import subprocess

import pytest
from support.build import Programs

from vgpu_launch import arch, elf
from vgpu_launch.arch import aarch64


def test_sp_of_a_64_bit_tracee() -> None:
    """aarch64: the stack pointer of a 64-bit tracee is read and written in NT_PRSTATUS."""
    regs = struct.pack("<34Q", *range(31), 0xFFFFF000, 0x400000, 0)
    assert aarch64.sp_from_prstatus(regs) == (0xFFFFF000, 8)
    new = aarch64.prstatus_with_sp(regs, 0xFFFFE000)
    assert aarch64.sp_from_prstatus(new) == (0xFFFFE000, 8)
    assert new[: 31 * 8] == regs[: 31 * 8] and new[32 * 8 :] == regs[32 * 8 :]


def test_sp_of_a_compat_tracee() -> None:
    """aarch64: the stack pointer of a 32-bit (compat) tracee is read and written."""
    regs = struct.pack("<18I", *range(13), 0xBEEF0000, 14, 15, 16, 17)
    assert aarch64.sp_from_prstatus(regs) == (0xBEEF0000, 4)
    assert aarch64.sp_from_prstatus(aarch64.prstatus_with_sp(regs, 0xBEEE0000)) == (0xBEEE0000, 4)


# ---------------------------------------------------------------------------------------------
# the machine's table, against the C library's own headers


def _archinfo(program: str) -> dict[str, int]:
    line = subprocess.run([program], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (item.split("=") for item in line.split())}


@pytest.mark.parametrize("name", ["archinfo", "archinfo32"], ids=["native", "compat"])
def test_abi_matches_the_system_headers(programs: Programs, name: str) -> None:
    """Word size, ELF machine, ptrace syscall, AUDIT_ARCH and loader of each ABI are the ones
    a program built here for that ABI has."""
    compat = name == "archinfo32"  # built with gcc -m32
    program = programs[name]
    info = _archinfo(program)
    native = arch.current()
    abi = native.abi(info["word"])
    assert abi is (native.compat if compat else native.native)
    assert (abi.elf_machine, abi.ptrace_syscall, abi.audit_arch) == (
        info["elf_machine"],
        info["ptrace"],
        info["audit_arch"],
    )
    if not compat:  # the tracer's own process forwards signals with this syscall
        assert native.rt_sigqueueinfo == info["rt_sigqueueinfo"]
    with open(program, "rb") as f:
        header = elf.parse_header(f.read(elf.HEADER_SIZE))
        assert header is not None and header.machine_name == abi.name
        assert elf.interp(f, header) == abi.loader
    assert native.word_of_loader(abi.loader) == abi.word


def test_this_interpreter_runs_on_the_native_abi() -> None:
    """arch.NATIVE is the machine of the running Python: its ELF header says so."""
    info = elf.elf_info("/proc/self/exe")
    assert info is not None and arch.NATIVE is not None
    assert (info.word, info.machine) == (8, arch.NATIVE.native.elf_machine)


def test_every_machine_is_found_by_its_names() -> None:
    """uname -m spellings select the machine; an unknown one selects none."""
    for a in arch.ALL:
        for name in (a.name, *a.aliases):
            assert arch.for_machine(name) is a
    assert arch.for_machine("sparc64") is None
    assert arch.machine_name(183) == "aarch64" and arch.machine_name(40) == "arm"
    assert arch.machine_name(243) == "machine 243"
