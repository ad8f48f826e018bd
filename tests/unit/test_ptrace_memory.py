"""The injector's fallback to PTRACE_PEEKDATA/POKEDATA, on a real tracee at its exec event,
checked against /proc/PID/mem."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support.procs import held_at_exec

from vgpu_launch import arch
from vgpu_launch.trace.injector import _PtraceMemory


@pytest.fixture
def at_exec_stop() -> Iterator[int]:
    """/bin/true, held at its exec event (our tracee)."""
    with held_at_exec(["/bin/true"]) as pid:
        yield pid


def test_reads_and_writes_match_proc_pid_mem(at_exec_stop: int) -> None:
    """Unaligned reads equal /proc/PID/mem's; an unaligned write below the stack pointer
    lands exactly, the bytes around it untouched; a read past the stack's top stops short."""
    pid = at_exec_stop
    sp, _ = arch.current().read_sp(pid)
    mem = _PtraceMemory(pid)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        for addr, size in ((sp, 64), (sp + 3, 29), (sp + 8, 1), (sp - 5, 17)):
            assert mem.read(size, addr) == os.pread(fd, size, addr)
        below = sp - 4096
        before = os.pread(fd, 64, below)
        assert mem.write(b"vgpu-launch!", below + 13) == 12
        after = os.pread(fd, 64, below)
        assert after[13:25] == b"vgpu-launch!"
        assert after[:13] == before[:13] and after[25:] == before[25:]
        whole = os.pread(fd, 1 << 20, sp)  # stops at the top of the stack mapping
        assert len(whole) < 1 << 20
        assert mem.read(len(whole) + 4096, sp) == whole
    finally:
        os.close(fd)
