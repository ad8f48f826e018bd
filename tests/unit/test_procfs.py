"""The /proc readers, on real processes: odd names, pending signals, ptrace stops, programs of
each word size."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.procs import held_at_exec

from vgpu_launch import procfs
from vgpu_launch.trace import ptracelib as pt


@contextlib.contextmanager
def _running(argv: list[str], **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, **kw)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_stat_of_a_program_with_parentheses_in_its_name(programs: Any, tmp_path: Path) -> None:
    """comm with spaces and ')' does not shift the fields: state and ppid are right."""
    odd = tmp_path / "a) R (b"
    odd.symlink_to(programs.probe)
    with held_at_exec([str(odd), "x y"]) as pid:
        st = procfs.stat(pid)
        assert st is not None
        assert (st.comm, st.ppid) == ("a) R (b", os.getpid())
        assert st.state == "t"  # ptrace stop
        assert procfs.ppid(pid) == os.getpid()
        assert procfs.cmdline(pid) == [str(odd), "x y"]
        assert procfs.comm(pid) == "a) R (b"
    assert procfs.stat(pid) is None and procfs.cmdline(pid) is None


def test_environment_and_program(programs: Any) -> None:
    """environ is the environment the program was started with; exe the file it runs."""
    with held_at_exec([programs.probe], env={"A": "1", "B": "x=y"}) as pid:
        assert procfs.environ(pid) == {"A": "1", "B": "x=y"}
        assert procfs.exe(pid) == os.path.realpath(programs.probe)
        assert procfs.tracer_pid(pid) == os.getpid()
        assert procfs.owed_stop(pid, signal.SIGUSR1, parked=())
        assert procfs.tasks(pid) == [pid]
        assert procfs.is_thread_of(pid, pid)
    assert procfs.environ(pid) is None and procfs.exe_or_empty(pid) == ""
    with pytest.raises(OSError):
        procfs.exe(pid)


def test_pending_signals() -> None:
    """A signal sent to a process that blocks it shows in shared_pending."""

    def block() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})

    with _running(["/bin/sleep", "30"], preexec_fn=block) as proc:
        assert procfs.shared_pending(proc.pid) == frozenset()
        os.kill(proc.pid, signal.SIGUSR2)
        os.kill(proc.pid, signal.SIGUSR1)
        assert procfs.shared_pending(proc.pid) == {signal.SIGUSR1, signal.SIGUSR2}
    assert procfs.shared_pending(proc.pid) == frozenset()


def test_ptrace_stop_is_seen() -> None:
    """A thread in a ptrace stop (state t) may owe a signal, unless it is parked; a running
    one owes none."""
    with _running(["/bin/sleep", "30"]) as proc:
        assert not procfs.owed_stop(proc.pid, signal.SIGUSR1, parked=())
        pt.seize(proc.pid, 0)
        assert procfs.tracer_pid(proc.pid) == os.getpid()
        pt.ptrace(pt.PTRACE_INTERRUPT, proc.pid)
        _, status = os.waitpid(proc.pid, pt.WALL)
        assert status >> 16 == pt.PTRACE_EVENT_STOP
        assert procfs.owed_stop(proc.pid, signal.SIGUSR1, parked=())
        assert not procfs.owed_stop(proc.pid, signal.SIGUSR1, parked={proc.pid})


@pytest.mark.parametrize(
    ("name", "expected"),
    [("probe", (8, False)), ("probe_static", (8, True)), ("probe32", (4, False))],
)
def test_word_size_and_linkage_of_a_running_program(
    programs: Any, name: str, expected: tuple[int, bool]
) -> None:
    """exe_word reads the program's ELF header and PT_INTERP; the maps and auxv agree."""
    with held_at_exec([programs[name]]) as pid:
        maps = procfs.read_maps(pid)
        assert maps is not None
        assert procfs.exe_word(pid, maps) == expected
        assert (maps.interp is None) == expected[1]
        assert procfs.secure(pid, expected[0]) is False
        auxv = procfs.auxv(pid, expected[0])
        assert auxv is not None and auxv[6] == os.sysconf("SC_PAGE_SIZE")  # AT_PAGESZ


def test_this_process() -> None:
    """Our own pid is listed, its maps have a dynamic loader, and nothing traces it here."""
    assert os.getpid() in procfs.pids()
    maps = procfs.read_maps(os.getpid())
    assert maps is not None and maps.interp is not None
    assert procfs.exe_word(os.getpid(), maps) == (8, False)
    assert procfs.status_field("self", "Pid") == str(os.getpid())
    assert procfs.yama_ptrace_scope() in (None, "0", "1", "2", "3")
