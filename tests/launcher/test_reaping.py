"""vgpu-launch is a child subreaper: orphans re-parented to it are reaped, hundreds at once."""

from __future__ import annotations

import os
from pathlib import Path

from support.build import Programs
from support.launch import launch_argv, started
from support.procs import children, ppid, stat_fields, state, wait_for


def test_hundreds_of_orphans_at_once_leave_no_zombie(programs: Programs, tmp_path: Path) -> None:
    """400 orphans exiting at once are all reaped: none left, no zombie."""
    n = 400
    with started(launch_argv(programs.libtest, programs.orphans, str(n)), tmp_path) as run:
        # CMD, before it prints "released": the earliest-started child of vgpu-launch (the
        # orphans are its grandchildren). It may exit as soon as they are reaped.
        cmd = min(wait_for("CMD", lambda: children(run.pid)), key=_start_time)
        run.out.expect(rf"^released {n}$", timeout=120)
        # seen from outside as well: nothing but CMD left under vgpu-launch, no zombie
        wait_for(
            "the orphans to be reaped",
            lambda: [p for p in children(run.pid) if p != cmd] == [],
            timeout=60,
        )
        m = run.out.expect(r"^left=(\d+) zombies=(\d+)$", timeout=60)
        status = run.wait_status(timeout=60)
    assert m.groups() == ("0", "0")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, run.stderr()


def test_orphans_while_cmd_keeps_running(programs: Programs, tmp_path: Path) -> None:
    """A daemonising child (double fork) is re-parented to vgpu-launch, not to init, and
    reaped when it exits; CMD's own status is still the one that counts."""
    script = (
        f"/bin/sh -c '/bin/sh -c \"echo gc=\\$\\$; read x < {tmp_path}/fifo\" &'; "
        f"read x < {tmp_path}/done; exit 4"
    )
    os.mkfifo(tmp_path / "fifo")
    os.mkfifo(tmp_path / "done")
    with started(launch_argv(programs.libtest, "/bin/sh", "-c", script), tmp_path) as run:
        gc = int(run.out.expect(r"^gc=(\d+)").group(1))
        st = wait_for("the orphan under vgpu-launch", lambda: ppid(gc) == run.pid)
        assert st
        with open(tmp_path / "fifo", "w") as f:
            f.write("x\n")
        wait_for("the orphan to be reaped", lambda: state(gc) is None)
        with open(tmp_path / "done", "w") as f:
            f.write("x\n")
        status = run.wait_status()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 4


def _start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot); a process gone meanwhile sorts last."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else 1 << 62
