"""Signals sent to vgpu-launch reach CMD: every catchable one but SIGCHLD, in order, each once,
a queued one with its value and sender; one sent to the whole process group (which CMD got
as well) is not delivered a second time."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from support.build import Programs
from support.launch import launch_argv, started
from support.procs import libc_sigqueue, wait_for
from support.sigrec import finish, next_signal

from vgpu_launch.forwarding import shared_pending

SI_USER, SI_QUEUE = 0, -1
STANDARD = [s for s in range(1, 32) if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)]
REALTIME = [signal.SIGRTMIN, signal.SIGRTMIN + 1, signal.SIGRTMAX - 1, signal.SIGRTMAX]


@pytest.mark.parametrize("threads", [0, 4], ids=["1-thread", "5-threads"])
def test_every_signal_forwarded_once_in_order(
    programs: Programs, tmp_path: Path, threads: int
) -> None:
    """Every catchable signal sent to vgpu-launch reaches CMD once, in order, with its value."""
    me = os.getpid()
    plan: list[tuple[int, int | None]] = [(s, None) for s in STANDARD]
    plan += [(s, 1000 + s) for s in REALTIME]  # queued, with a value
    plan += [(signal.SIGUSR1, 0x7FFF_FFFF_0000_0001), (signal.SIGTERM, 42)]
    random.Random(3).shuffle(plan)
    with started(
        launch_argv(programs.libtest, programs.sigrec, "-T", str(threads)), tmp_path
    ) as run:
        ready = run.out.expect(r"^ready pid=(\d+)")
        cmd = int(ready.group(1))
        got = []
        for sig, value in plan:
            if value is None:
                os.kill(run.pid, sig)
            else:
                libc_sigqueue(run.pid, sig, value)
            got.append(next_signal(run))
        extra = finish(run)
    assert [g["sig"] for g in got] == [s for s, _v in plan]
    for (sig, value), g in zip(plan, got, strict=True):
        if value is None:
            assert (g["code"], g["pid"]) == (SI_USER, run.pid), (sig, g)
        else:
            # passed on with rt_sigqueueinfo: the sender and the whole value are kept
            assert (g["code"], g["pid"], g["value"]) == (SI_QUEUE, me, value), (sig, g)
    assert extra == []
    assert cmd != run.pid


@pytest.mark.parametrize("threads", [0, 4], ids=["1-thread", "5-threads"])
def test_signals_sent_to_the_process_group_arrive_once(
    programs: Programs, tmp_path: Path, threads: int
) -> None:
    """`kill -s SIG -PGID` (`kill %1`, `fg`, `kill 0`): CMD gets it from the kernel as
    vgpu-launch does; forwarding it as well would deliver it twice. With threads, any thread
    of CMD may take it (as in a Go program)."""
    sigs = [
        signal.SIGUSR1,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGCONT,
        signal.SIGWINCH,
        signal.SIGUSR2,
        signal.SIGQUIT,
    ] * 3
    with started(
        launch_argv(programs.libtest, programs.sigrec, "-T", str(threads)), tmp_path
    ) as run:
        run.out.expect(r"^ready ")
        got = []
        for sig in sigs:
            os.killpg(run.pid, sig)
            got.append(next_signal(run))
        extra = finish(run)
    assert [g["sig"] for g in got] == sigs
    assert all(g["pid"] == os.getpid() for g in got)
    assert extra == []


def test_queued_signal_to_the_group_is_not_merged_away(programs: Programs, tmp_path: Path) -> None:
    """A real-time signal sent to vgpu-launch alone is forwarded even while one is queued."""
    with started(launch_argv(programs.libtest, programs.sigrec), tmp_path) as run:
        run.out.expect(r"^ready ")
        for value in (1, 2, 3):
            libc_sigqueue(run.pid, signal.SIGRTMIN + 2, value)
        got = [next_signal(run) for _ in range(3)]
        extra = finish(run)
    assert [g["value"] for g in got] == [1, 2, 3]
    assert extra == []


def test_signals_from_cmd_itself_are_not_sent_back(programs: Programs, tmp_path: Path) -> None:
    """CMD doing ``kill 0`` got the signal itself; ``kill $PPID`` is for its parent: in
    neither case does CMD get it (again) from vgpu-launch. A descendant's ``kill 0`` likewise."""
    script = (
        'c=0; trap "c=\\$((c+1))" USR1; trap "echo usr1=\\$c; exit 0" USR2\n'
        "kill -USR1 0; echo step1\n"
        "read x; kill -USR1 $PPID; echo step2\n"
        'read x; /bin/sh -c "kill -USR1 0"; echo step3\n'
        "while :; do sleep 0.05; done\n"
    )
    with started(launch_argv(programs.libtest, "/bin/sh", "-c", script), tmp_path) as run:
        assert run.proc.stdin is not None
        run.out.expect(r"^step1$")
        run.proc.stdin.write(b"\n")
        run.proc.stdin.flush()
        run.out.expect(r"^step2$")
        run.proc.stdin.write(b"\n")
        run.proc.stdin.flush()
        run.out.expect(r"^step3$")
        # every decision on the signals above is made before this one is forwarded
        os.kill(run.pid, signal.SIGUSR2)
        m = run.out.expect(r"^usr1=(\d+)$")
        status = run.wait_status()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, run.stderr()
    assert m.group(1) == "2"  # the kill 0 of CMD and of its child, once each


@pytest.mark.parametrize("threads", [0, 4], ids=["1-thread", "5-threads"])
def test_mixed_targets_each_arrive_once(programs: Programs, tmp_path: Path, threads: int) -> None:
    """The same signals sent to CMD directly, to vgpu-launch, and to the whole group, mixed:
    every one sent arrives once. (A signal sent to CMD alone a moment before the same one is
    sent to vgpu-launch must not make vgpu-launch think CMD already has the second.) The next
    signal waits until vgpu-launch has taken its copy of the previous one: two identical
    standard signals pending at once merge, in vgpu-launch as in any process."""
    sigs = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGCONT]
    rnd = random.Random(7)
    with started(
        launch_argv(programs.libtest, programs.sigrec, "-T", str(threads)), tmp_path
    ) as run:
        cmd = int(run.out.expect(r"^ready pid=(\d+)").group(1))
        for _ in range(60):
            sig = rnd.choice(sigs)
            target = rnd.choice(["cmd", "launcher", "group"])
            if target == "cmd":
                os.kill(cmd, sig)
            elif target == "launcher":
                os.kill(run.pid, sig)
            else:
                os.killpg(run.pid, sig)
            got = next_signal(run)
            assert got["sig"] == sig, (target, got)
            wait_for("vgpu-launch to take its copy", lambda s=sig: s not in shared_pending(run.pid))  # type: ignore[misc]
        extra = finish(run)
    assert extra == []
