"""vgpu-launch as PID 1 of a PID namespace (a container's init): it reaps everything, passes
signals on, and exits 128+N for a CMD killed by signal N (init cannot die of its own signal)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from support.build import Programs
from support.launch import clean_env, launch_argv, started
from support.procs import children, parse_sig, wait_for

UNSHARE = ["unshare", "--fork", "--pid", "--mount-proc"]


@pytest.fixture(scope="module")
def pidns() -> list[str]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.decode().strip()}")
    return UNSHARE


def test_pid1_reaps_everything(programs: Programs, tmp_path: Path, pidns: list[str]) -> None:
    """As PID 1, vgpu-launch reaps 300 orphans that exit at once: none left, no zombie."""
    r = subprocess.run(
        [
            *pidns,
            *launch_argv(
                programs.libtest,
                "/bin/sh",
                "-c",
                f"echo pid=$$ ppid=$PPID; exec {programs.orphans} 300",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert " ppid=1\n" in r.stdout  # vgpu-launch is PID 1
    assert "released 300" in r.stdout
    assert "left=0 zombies=0" in r.stdout, r.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_pid1_cmd_killed_by_signal_exits_128_plus_n(
    programs: Programs, tmp_path: Path, pidns: list[str], sig: int
) -> None:
    """As PID 1, with CMD killed by signal N, vgpu-launch exits 128+N (init cannot die of it)."""
    r = subprocess.run(
        [*pidns, *launch_argv(programs.libtest, programs.die, "signal", str(int(sig)))],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    # unshare passes its child's exit status on: an exit, not a death by signal
    assert r.returncode == 128 + sig, r.stderr[-3000:]


def test_pid1_exit_code_and_signal_forwarding(
    programs: Programs, tmp_path: Path, pidns: list[str]
) -> None:
    """`docker stop`: SIGTERM to PID 1 from outside the namespace (sender pid 0 there)."""
    with started(
        [*pidns, *launch_argv(programs.libtest, programs.sigrec, "-e", "15")], tmp_path
    ) as run:
        run.out.expect(r"^ready pid=\d+ ")
        init = wait_for("vgpu-launch as PID 1", lambda: children(run.pid))[0]
        os.kill(init, signal.SIGUSR1)
        got = parse_sig(run.out.expect(r"^sig=.*").group(0))
        assert (got["sig"], got["code"], got["pid"]) == (signal.SIGUSR1, 0, 1)
        os.kill(init, signal.SIGTERM)
        got = parse_sig(run.out.expect(r"^sig=.*").group(0))
        assert got["sig"] == signal.SIGTERM
        run.out.expect(r"^done n=2$")
        status = run.wait_status()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, run.stderr()
