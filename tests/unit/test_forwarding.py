"""Signal forwarding's pure decisions, without processes: where a signal comes from, which
kernel-sent signals CMD did not get, siginfo parsing, the set of signals passed on."""

from __future__ import annotations

import signal
import struct

import pytest

from vgpu_launch import forwarding, siginfo

OWN, CMD, OTHER = 100, 200, 300


@pytest.mark.parametrize(
    ("code", "sender", "want"),
    [
        (0, OTHER, forwarding.USER),  # kill
        (-1, OTHER, forwarding.USER),  # sigqueue
        (-6, OTHER, forwarding.USER),  # tgkill
        (0, 0, forwarding.USER),  # from outside our PID namespace (docker kill)
        (0, OWN, forwarding.OWN),  # our own SIGPIPE, the tracer's wake-up
        (-6, OWN, forwarding.OWN),
        (0, CMD, forwarding.FROM_CMD),  # kill(getppid()) or kill(0) by CMD
        (0x80, 0, forwarding.KERNEL),  # SI_KERNEL: a terminal
        (0x80, OWN, forwarding.KERNEL),
    ],
)
def test_origin(code: int, sender: int, want: str) -> None:
    """Who sent a signal, from its si_code and sender: a user, vgpu-launch, CMD, the kernel."""
    assert forwarding.origin(code, sender, OWN, CMD) == want


@pytest.mark.parametrize(
    ("sig", "same_group", "leader", "want"),
    [
        (signal.SIGINT, True, False, False),  # Ctrl-C: CMD got it from the terminal
        (signal.SIGINT, False, False, True),  # CMD in a group of its own did not
        (signal.SIGWINCH, True, True, False),
        (signal.SIGTSTP, False, False, True),
        (signal.SIGHUP, True, True, True),  # hang-up: to the session leader alone
        (signal.SIGCONT, True, True, True),
        (signal.SIGHUP, True, False, False),  # the group got it (the leader exited)
        (signal.SIGXCPU, False, True, False),  # about vgpu-launch itself
        (signal.SIGIO, False, False, False),
    ],
)
def test_forward_kernel_signal(sig: int, same_group: bool, leader: bool, want: bool) -> None:
    """A kernel-sent signal is passed on only where CMD did not get it from the kernel too."""
    assert (
        forwarding.forward_kernel_signal(sig, same_group=same_group, session_leader=leader) is want
    )


def test_parse_siginfo_keeps_the_whole_value() -> None:
    """siginfo parsing keeps the sender and the whole 64-bit sigqueue value."""
    raw = struct.pack("<iii4xiiQ", 10, 0, -1, 4242, 1000, 0xDEAD_BEEF_0000_0042).ljust(128, b"\0")
    info = siginfo.parse_siginfo(raw)
    assert (info.signo, info.code, info.pid, info.uid, info.value) == (
        10,
        -1,
        4242,
        1000,
        0xDEAD_BEEF_0000_0042,
    )


def test_forwarded_set() -> None:
    """Every signal but SIGCHLD is forwarded; SIGURG is not treated as a group signal."""
    assert signal.SIGCHLD not in forwarding.FORWARDED
    assert {
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGFPE,
        signal.SIGILL,
        signal.SIGABRT,
        signal.SIGSYS,
        signal.SIGTRAP,
        signal.SIGRTMIN,
        signal.SIGRTMAX,
    } <= forwarding.FORWARDED
    assert forwarding.GROUP_SIGNALS <= forwarding.FORWARDED
    assert signal.SIGURG not in forwarding.GROUP_SIGNALS  # Go's preemption: the hot path
