"""The launcher's pure decisions, without processes: where a signal comes from, which
kernel-sent signals CMD did not get, siginfo parsing, the environment hand-over of
bin/vgpu-launch, finding CMD."""

from __future__ import annotations

import signal
import struct
from pathlib import Path

import pytest

from vgpu_launch import command, forwarding, siginfo, sigstate
from vgpu_launch.errors import LaunchError

OWN, CMD, OTHER = 100, 200, 300


@pytest.mark.parametrize(("code", "sender", "want"), [
    (0, OTHER, forwarding.USER),  # kill
    (-1, OTHER, forwarding.USER),  # sigqueue
    (-6, OTHER, forwarding.USER),  # tgkill
    (0, 0, forwarding.USER),  # from outside our PID namespace (docker kill)
    (0, OWN, forwarding.OWN),  # our own SIGPIPE, the tracer's wake-up
    (-6, OWN, forwarding.OWN),
    (0, CMD, forwarding.FROM_CMD),  # kill(getppid()) or kill(0) by CMD
    (0x80, 0, forwarding.KERNEL),  # SI_KERNEL: a terminal
    (0x80, OWN, forwarding.KERNEL),
])
def test_origin(code: int, sender: int, want: str) -> None:
    assert forwarding.origin(code, sender, OWN, CMD) == want


@pytest.mark.parametrize(("sig", "same_group", "leader", "want"), [
    (signal.SIGINT, True, False, False),  # Ctrl-C: CMD got it from the terminal
    (signal.SIGINT, False, False, True),  # CMD in a group of its own did not
    (signal.SIGWINCH, True, True, False),
    (signal.SIGTSTP, False, False, True),
    (signal.SIGHUP, True, True, True),  # hang-up: to the session leader alone
    (signal.SIGCONT, True, True, True),
    (signal.SIGHUP, True, False, False),  # the group got it (the leader exited)
    (signal.SIGXCPU, False, True, False),  # about vgpu-launch itself
    (signal.SIGIO, False, False, False),
])
def test_forward_kernel_signal(sig: int, same_group: bool, leader: bool, want: bool) -> None:
    assert forwarding.forward_kernel_signal(sig, same_group=same_group,
                                            session_leader=leader) is want


def test_parse_siginfo_keeps_the_whole_value() -> None:
    raw = struct.pack("<iii4xiiQ", 10, 0, -1, 4242, 1000, 0xDEAD_BEEF_0000_0042).ljust(128, b"\0")
    info = siginfo.parse_siginfo(raw)
    assert (info.signo, info.code, info.pid, info.uid, info.value) == (
        10, -1, 4242, 1000, 0xDEAD_BEEF_0000_0042)


def test_forwarded_set() -> None:
    assert signal.SIGCHLD not in forwarding.FORWARDED
    assert {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
            signal.SIGSYS, signal.SIGTRAP, signal.SIGRTMIN, signal.SIGRTMAX} <= forwarding.FORWARDED
    assert forwarding.GROUP_SIGNALS <= forwarding.FORWARDED
    assert signal.SIGURG not in forwarding.GROUP_SIGNALS  # Go's preemption: the hot path


def test_restore_environment() -> None:
    env = {"PWD": "/set/by/sh", "SHLVL": "2", "_": "/usr/bin/python3", "LC_CTYPE": "C.UTF-8",
           "KEEP": "x", sigstate.ENV0_VAR: "LC_CTYPE\nPWD=/given\nOLDPWD\nSHLVL=1\n_"}
    sigstate.restore_environment(env)
    assert env == {"PWD": "/given", "SHLVL": "1", "KEEP": "x"}
    env = {"PWD": "/x"}
    sigstate.restore_environment(env)  # no record (not started by bin/vgpu-launch)
    assert env == {"PWD": "/x"}


def test_resolve(tmp_path: Path) -> None:
    exe = tmp_path / "bin" / "prog"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    plain = tmp_path / "bin" / "plain"
    plain.write_text("")
    plain.chmod(0o644)
    assert command.resolve("prog", f"/nonexistent:{exe.parent}") == str(exe)
    assert command.resolve(str(exe), None) == str(exe)
    with pytest.raises(LaunchError) as e:
        command.resolve("no-such-prog-xyz", str(exe.parent))
    assert e.value.code == 127 and "no-such-prog-xyz" in str(e.value)
    with pytest.raises(LaunchError) as e:
        command.resolve(str(tmp_path), None)
    assert e.value.code == 126
    with pytest.raises(LaunchError) as e:
        command.resolve("plain", str(exe.parent))
    assert e.value.code == 126 and "plain" in str(e.value)
    with pytest.raises(LaunchError) as e:
        command.resolve("", None)
    assert e.value.code == 2
