"""aarch64 register access, which no machine here can run: the NT_PRSTATUS layouts."""

from __future__ import annotations

import struct

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
