"""Whatever happens to vgpu-launch's parent, or to its own main thread, it keeps serving CMD
and exits with CMD's status."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import textwrap
from pathlib import Path

import pytest
from support.build import Programs
from support.launch import clean_env, launch_argv, started
from support.procs import state, wait_for

PYTHON = clean_env()["VGPU_LAUNCH_PYTHON"]  # the interpreter bin/vgpu-launch runs

# CMD: record USR1/USR2, survive a hang-up, wait for a file, start a program with an empty
# environment (it must still get the preload), exit 7.
CMD = textwrap.dedent("""\
    out=$0; go=$1
    trap 'echo usr1 >> "$out"' USR1
    trap 'echo usr2 >> "$out"' USR2
    trap '' HUP
    echo ready >> "$out"
    while [ ! -e "$go" ]; do sleep 0.02; done
    env -i /bin/sh -c 'echo "preload=$LD_PRELOAD"' >> "$out"
    exit 7
""")

# A child subreaper (so that the orphaned vgpu-launch becomes its child) runs PARENT, which
# starts vgpu-launch with its stdout and stderr on pipes (or a terminal) of its own and dies
# without a word. Then it signals vgpu-launch, lets CMD go on, and reports how it ended.
HELPER = textwrap.dedent("""\
    import ctypes, os, signal, subprocess, sys, time
    mode, out, go, *argv = sys.argv[1:]
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    parent = subprocess.Popen([sys.executable, "-c", sys.stdin.read(), mode, out, *argv],
                              stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.wait()  # gone, its pipes or terminal with it
    def wait_line(line):
        while line not in open(out).read().split():
            time.sleep(0.01)
    for sig, line in ((signal.SIGUSR1, "usr1"), (signal.SIGUSR2, "usr2")):
        os.kill(pid, sig)
        wait_line(line)
    open(go, "w").close()
    _, status = os.waitpid(pid, 0)
    print(f"status={status}", flush=True)
""")
PARENT = textwrap.dedent("""\
    import os, pty, subprocess, sys, time
    mode, out, *argv = sys.argv[1:]
    if mode == "pipes":
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pid = proc.pid
    else:  # a terminal, vgpu-launch the session leader: the hang-up reaches it
        pid, master = pty.fork()
        if pid == 0:
            os.execvp(argv[0], argv)
    while "ready" not in open(out).read().split():
        time.sleep(0.01)
    print(pid, flush=True)
    os._exit(0)
""")


@pytest.mark.parametrize("mode", ["pipes", "terminal"])
def test_parent_gone_without_a_word(programs: Programs, tmp_path: Path, mode: str) -> None:
    """The parent dies, taking the other ends of vgpu-launch's stdout and stderr (pipes, or a
    terminal that hangs up): signals are still forwarded, the tree still gets the preload,
    and vgpu-launch exits with CMD's status."""
    out, go, log = tmp_path / "out", tmp_path / "go", tmp_path / "log"
    out.write_text("")
    argv = launch_argv(
        programs.libtest,
        "/bin/sh",
        "-c",
        CMD,
        out,
        go,
        options=["--log-level", "debug", "--log-file", str(log)],
    )
    helper = subprocess.run(
        [PYTHON, "-c", HELPER, mode, str(out), str(go), *argv],
        input=PARENT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert helper.returncode == 0, helper.stderr
    status = int(helper.stdout.split("status=")[1])
    lines = out.read_text().split()
    assert lines[:3] == ["ready", "usr1", "usr2"]
    assert lines[3:] == [f"preload={programs.libtest}"]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


# -- the main thread gone ---------------------------------------------------------------------

_PTRACE_PEEKTEXT, _PTRACE_GETREGS, _PTRACE_SETREGS, _PTRACE_DETACH = 1, 12, 13, 17
_PTRACE_SEIZE, _PTRACE_INTERRUPT = 0x4206, 0x4207
_WALL = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    r = _libc.ptrace(request, tid, ctypes.c_void_p(addr), ctypes.c_void_p(data))
    if r == -1 and ctypes.get_errno():
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return int(r)


def end_main_thread(pid: int) -> None:
    """Make the main thread of ``pid``, and only it, call exit(0) (x86_64): it sits in
    rt_sigtimedwait; stop it, point it back at its `syscall` instruction with exit's number,
    let it go. Its process then has a zombie leader and its other threads running."""
    _ptrace(_PTRACE_SEIZE, pid)
    try:
        _ptrace(_PTRACE_INTERRUPT, pid)
        os.waitpid(pid, _WALL)
        regs = (ctypes.c_ulonglong * 27)()
        _ptrace(_PTRACE_GETREGS, pid, 0, ctypes.addressof(regs))
        rip = regs[16]
        assert _ptrace(_PTRACE_PEEKTEXT, pid, rip - 2) & 0xFFFF == 0x050F  # syscall
        regs[10], regs[14] = 60, 0  # rax: exit, rdi: 0
        regs[15] = 2**64 - 1  # orig_rax -1: no restart of the interrupted call
        regs[16] = rip - 2
        _ptrace(_PTRACE_SETREGS, pid, 0, ctypes.addressof(regs))
    finally:
        _ptrace(_PTRACE_DETACH, pid)


@pytest.mark.skipif(
    platform.machine() != "x86_64",
    reason="ending one thread by syscall injection is written for x86_64",
)
def test_main_thread_gone(programs: Programs, tmp_path: Path) -> None:
    """vgpu-launch's main thread ends on its own (a zombie leader): the tracer thread serves on
    and, when CMD exits, vgpu-launch exits with CMD's status, not the main thread's."""
    out, go = tmp_path / "out", tmp_path / "go"
    out.write_text("")
    with started(launch_argv(programs.libtest, "/bin/sh", "-c", CMD, out, go), tmp_path) as run:
        wait_for("CMD", lambda: "ready" in out.read_text())
        wait_for(
            "the main thread to wait for signals",
            lambda: Path(f"/proc/{run.pid}/task/{run.pid}/syscall").read_text().startswith("128 "),
        )  # rt_sigtimedwait
        end_main_thread(run.pid)
        wait_for("the main thread to be gone", lambda: state(run.pid) == "Z")
        go.touch()
        status = run.wait_status()
        stderr = run.stderr()  # closed with the run
    assert out.read_text().split() == ["ready", f"preload={programs.libtest}"]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7, stderr
    assert '"event":"end"' in stderr
