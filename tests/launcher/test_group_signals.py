"""A signal sent to the whole process group reaches CMD once, however late the tracer is.

vgpu-launch gets its own copy of a group kill and must not forward it when CMD got one too;
whether CMD did is known from the tracer thread (forwarding.GroupSignalLedger). These tests
hold that thread stopped with a second tracer (what a loaded host or a paused VM does to it),
and repeat group kills many times: ``VGPU_TEST_GROUP_SIGNAL_ROUNDS`` (default 200) rounds, e.g.
``VGPU_TEST_GROUP_SIGNAL_ROUNDS=5000 pytest tests/launcher/test_group_signals.py -k stress``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.build import Programs
from support.launch import Started, launch_argv, started
from support.procs import wait_for
from support.sigrec import finish, next_signal

ROUNDS = int(os.environ.get("VGPU_TEST_GROUP_SIGNAL_ROUNDS", "200"))
GROUP = [
    signal.SIGUSR1,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGCONT,
    signal.SIGWINCH,
    signal.SIGUSR2,
    signal.SIGQUIT,
]
# How long the tracer thread is held while CMD's copy waits for it: well past the 0.1 s
# after which vgpu-launch used to stop waiting and forward (CMD then got the signal twice).
HOLD = 0.5

_PTRACE_DETACH, _PTRACE_SEIZE, _PTRACE_INTERRUPT = 17, 0x4206, 0x4207
_WALL = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, tid: int) -> None:
    if _libc.ptrace(request, tid, None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")


@contextlib.contextmanager
def held(tid: int) -> Iterator[None]:
    """Keep one thread stopped (a second tracer's PTRACE_INTERRUPT); its process runs on."""
    _ptrace(_PTRACE_SEIZE, tid)
    try:
        _ptrace(_PTRACE_INTERRUPT, tid)
        os.waitpid(tid, _WALL)
        yield
    finally:
        _ptrace(_PTRACE_DETACH, tid)


def tracer_thread(cmd: int) -> int:
    """vgpu-launch's tracer thread: the TracerPid of CMD."""
    for line in Path(f"/proc/{cmd}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid in /proc/{cmd}/status")


def stopped_threads(pid: int) -> list[int]:
    """The threads of ``pid`` in a ptrace stop (state ``t``)."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
            if stat.rpartition(b")")[2].split()[0] == b"t":
                found.append(int(tid))
    return found


def decisions(run: Started) -> str:
    """vgpu-launch's debug lines on each signal: what CMD took, and what became of ours."""
    return "\n".join(
        line
        for line in run.stderr().splitlines()
        if '"event":"signal"' in line or '"event":"cmd-took"' in line
    )


def group_kill_while_held(run: Started, cmd: int, tracer: int, sig: int, hold: float) -> None:
    """Kill the group while the tracer thread is held: once CMD waits for the tracer (it took
    its copy and sits in its signal-delivery-stop; or, for SIGCONT, in the stop the kernel
    asks of every thread first), hold it ``hold`` seconds more."""
    wait_for("the tracer to let every thread of CMD go on", lambda: not stopped_threads(cmd))
    with held(tracer):
        os.killpg(run.pid, sig)
        wait_for("CMD to wait for the tracer", lambda: stopped_threads(cmd))
        time.sleep(hold)


@pytest.mark.parametrize("threads", [0, 4], ids=["1-thread", "5-threads"])
def test_group_signal_arrives_once_while_the_tracer_is_late(
    programs: Programs, tmp_path: Path, threads: int
) -> None:
    """A group kill that CMD takes while the tracer thread is not running arrives once."""
    sigs = [signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2]
    with started(
        launch_argv(programs.libtest, programs.sigrec, "-T", str(threads)), tmp_path
    ) as run:
        cmd = int(run.out.expect(r"^ready pid=(\d+)").group(1))
        tracer = tracer_thread(cmd)
        got = []
        for sig in sigs:
            group_kill_while_held(run, cmd, tracer, sig, HOLD)
            got.append(next_signal(run))
        extra = finish(run)
    assert [g["sig"] for g in got] == sigs
    assert all(g["pid"] == os.getpid() for g in got)  # CMD's own copies, none forwarded
    assert extra == []


@pytest.mark.parametrize("threads", [0, 4], ids=["1-thread", "5-threads"])
def test_group_signal_stress(programs: Programs, tmp_path: Path, threads: int) -> None:
    """Many group kills in a row, one in ten while the tracer thread is held for a moment:
    each arrives once (set VGPU_TEST_GROUP_SIGNAL_ROUNDS for more rounds)."""
    rnd = random.Random(11 + threads)
    with started(
        launch_argv(programs.libtest, programs.sigrec, "-T", str(threads)), tmp_path
    ) as run:
        cmd = int(run.out.expect(r"^ready pid=(\d+)").group(1))
        tracer = tracer_thread(cmd)
        wrong = []
        for n in range(ROUNDS):
            sig = rnd.choice(GROUP)
            if rnd.random() < 0.1:
                group_kill_while_held(run, cmd, tracer, sig, rnd.uniform(0, 0.2))
            else:
                os.killpg(run.pid, sig)
            got = next_signal(run)
            if got["sig"] != sig or got["pid"] != os.getpid():
                wrong.append((n, signal.Signals(sig).name, got))
                break  # the rest of the output is out of step
        extra = finish(run) if not wrong else []
    assert wrong == [], f"{len(wrong)} wrong in {ROUNDS} rounds"
    assert extra == []


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCONT],
    ids=lambda s: signal.Signals(s).name,
)
def test_group_kill_whose_sender_stalls_between_members_arrives_once(
    programs: Programs, tmp_path: Path, sig: int
) -> None:
    """A group kill whose sender is held up after CMD's copy, before vgpu-launch's, arrives once."""
    # The kernel signals a group newest member first: CMD, then vgpu-launch. A sender that is
    # preempted in between (an interrupt, a vCPU the hypervisor took away) lets CMD take its
    # copy, and the tracer see it, before vgpu-launch's copy exists.
    debug = ["--log-level", "debug"]  # a failure shows each decision
    with started(launch_argv(programs.libtest, programs.sigrec, options=debug), tmp_path) as run:
        cmd = int(run.out.expect(r"^ready pid=(\d+)").group(1))
        got, senders = [], []
        for _ in range(5):
            argv = [programs.splitkill, str(sig), "5000", str(cmd), str(run.pid)]
            with subprocess.Popen(argv) as sender:
                assert sender.wait() == 0
            senders.append(sender.pid)
            got.append(next_signal(run))
        extra = finish(run)
        why = decisions(run)
    assert [(g["sig"], g["pid"]) for g in got] == [(sig, pid) for pid in senders], why
    assert extra == [], why  # none forwarded on top of CMD's own copy


def test_group_kill_whose_sender_is_starved_between_members_arrives_once(
    programs: Programs, tmp_path: Path
) -> None:
    """A group kill whose sender waits long for a CPU between CMD and vgpu-launch arrives once."""
    # The sender shares one CPU, at nice 19, with a busy loop: after its first kill it waits
    # a long while (many times vgpu-launch's limits in CPU time) before it runs again.
    cpu = max(os.sched_getaffinity(0))

    def starved() -> None:
        os.sched_setaffinity(0, {cpu})
        os.nice(19)

    with contextlib.ExitStack() as stack:
        hog = stack.enter_context(subprocess.Popen(["sh", "-c", "while :; do :; done"]))
        stack.callback(hog.kill)
        os.sched_setaffinity(hog.pid, {cpu})
        debug = ["--log-level", "debug"]  # a failure shows each decision
        run = stack.enter_context(
            started(launch_argv(programs.libtest, programs.sigrec, options=debug), tmp_path)
        )
        cmd = int(run.out.expect(r"^ready pid=(\d+)").group(1))
        got, senders = [], []
        for _ in range(5):
            argv = [programs.splitkill, str(signal.SIGUSR1), "5000", str(cmd), str(run.pid)]
            with subprocess.Popen(argv, preexec_fn=starved) as sender:
                assert sender.wait() == 0
            senders.append(sender.pid)
            got.append(next_signal(run))
        extra = finish(run)
        why = decisions(run)
    assert [(g["sig"], g["pid"]) for g in got] == [(signal.SIGUSR1, pid) for pid in senders], why
    assert extra == [], why  # none forwarded on top of CMD's own copy
