"""``vgpu-launch status``: which processes of a tree really have the preload mapped, what their
/proc/PID/environ shows, and a note where the two disagree."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import systemctl
from support.build import Programs
from support.launch import LAUNCHER, clean_env
from support.procs import children, state, wait_for


def status(*args: str, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """Run ``vgpu-launch status ARGS --format json``: (exit status, parsed JSON, stderr)."""
    proc = subprocess.run(
        [str(LAUNCHER), "status", *args, "--format", "json"],
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        data = None
    return proc.returncode, data, proc.stderr


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children(todo.pop()):
            out.add(c)
            todo.append(c)
    return out


def _wait_tree(pid: int, n: int, exes: list[str], timeout: float = 10) -> None:
    """Until ``pid`` has ``n`` descendants, and every one that runs one of ``exes`` (sleepers)
    is asleep in its ``usleep``: ld.so has finished with it."""

    def up() -> bool:
        ds = _descendants(pid)
        running: dict[int, str] = {}
        for d in ds:
            with contextlib.suppress(OSError):
                running[d] = os.readlink(f"/proc/{d}/exe")
        ours = [d for d, exe in running.items() if exe in exes]
        return (
            len(ds) >= n
            and set(exes) <= set(running.values())
            and all(state(d) == "S" for d in ours)
        )

    wait_for(f"the tree under {pid}", up, timeout, describe=lambda: str(_descendants(pid)))


def _traced(programs: Programs, *cmd: str) -> list[str]:
    """vgpu-launch's command line for CMD with the test library preloaded."""
    return [str(LAUNCHER), "--log-format", "json", "--preload", programs.libshim, "--", *cmd]


@contextlib.contextmanager
def _running(argv: list[str], **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _rows(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["pid"]: r for r in data["processes"]}


def _by_command(data: dict[str, Any], needle: str) -> list[dict[str, Any]]:
    return [r for r in data["processes"] if r["command"].startswith(needle)]


# ---------------------------------------------------------------------------------------------


def test_tree_outside_vgpu_launch(programs: Programs) -> None:
    """Some processes were given LD_PRELOAD by hand, some not: the ones without are found."""
    script = (
        f"LD_PRELOAD={programs.libshim} {programs.sleeper} 5000 & "
        f"{programs.sleeper} 5001 & {programs.sleeper_static} 5002 & wait"
    )
    with _running(["sh", "-c", script], env=clean_env()) as sh:
        _wait_tree(sh.pid, 3, [programs.sleeper, programs.sleeper_static])
        rc, data, err = status(str(sh.pid), "--preload", programs.libshim)
    assert rc == 1, err
    assert data["libraries"] == [programs.libshim]
    assert data["ok"] is False
    rows = _rows(data)

    shell = rows[sh.pid]
    assert shell["mapped"] == {programs.libshim: None} and shell["counted"]
    assert "escaped" in shell["note"]

    with_lib = _by_command(data, f"{programs.sleeper} 5000")[0]
    assert with_lib["mapped"][programs.libshim] == programs.libshim
    assert with_lib["environ_ld_preload"] == programs.libshim
    assert with_lib["ok"] and with_lib["note"] == ""
    assert with_lib["depth"] == 1 and with_lib["ppid"] == sh.pid

    without = _by_command(data, f"{programs.sleeper} 5001")[0]
    assert without["mapped"][programs.libshim] is None and not without["ok"]
    assert without["environ_ld_preload"] is None
    assert "escaped" in without["note"]

    static = _by_command(data, f"{programs.sleeper_static} 5002")[0]
    assert static["static"] is True and not static["counted"] and static["ok"]
    assert "static binary" in static["note"]

    assert sorted(data["summary"]["missing"]) == sorted([sh.pid, without["pid"]])


def test_tree_under_vgpu_launch(programs: Programs, tmp_path: Path) -> None:
    """Every process has the library; the one started with `env -i` shows no LD_PRELOAD in
    /proc/PID/environ, and the note says why. A 32-bit program lacks the 64-bit library."""
    script = f"env -i {programs.sleeper} 6000 & {programs.sleeper} 6001 & wait"
    argv = _traced(programs, "sh", "-c", script)
    with _running(argv, env=clean_env()) as launcher:
        _wait_tree(launcher.pid, 3, [programs.sleeper])
        rc, data, err = status(str(launcher.pid), "--preload", programs.libshim)
        assert rc == 0, (err, data)
        rows = _rows(data)
        assert rows[launcher.pid]["role"] == "launcher" and not rows[launcher.pid]["counted"]
        injected = _by_command(data, f"{programs.sleeper} 6000")[0]
        assert injected["mapped"][programs.libshim] == programs.libshim
        assert injected["environ_ld_preload"] is None
        assert "injected at exec" in injected["note"]
        assert f"/proc/{injected['pid']}/environ" in injected["note"]
        inherited = _by_command(data, f"{programs.sleeper} 6001")[0]
        assert inherited["environ_ld_preload"] == programs.libshim and inherited["note"] == ""

        # status on a single process of the tree: the libraries come from the vgpu-launch
        # process above it when neither --preload nor the configuration names them
        empty = tmp_path / "empty.conf"
        empty.write_text("")
        rc, data, err = status(
            str(injected["pid"]), env=clean_env({"VGPU_LAUNCH_CONFIG": str(empty)})
        )
        assert rc == 0, err
        assert data["libraries"] == [programs.libshim]
        assert f"vgpu-launch pid {launcher.pid}" in data["libraries_from"]

        # default: every vgpu-launch process's tree, this one among them
        rc, data, err = status("--preload", programs.libshim)
        assert launcher.pid in _rows(data), (err, data)


def test_32bit_program_in_tree(programs: Programs) -> None:
    """A 32-bit program under a 64-bit-only library is shown without it, and why."""
    argv = _traced(programs, programs.sleeper32, "5000")
    with _running(argv, env=clean_env()) as launcher:
        _wait_tree(launcher.pid, 1, [programs.sleeper32])
        rc, data, err = status(str(launcher.pid), "--preload", programs.libshim)
    assert rc == 1, err
    row = _by_command(data, programs.sleeper32)[0]
    assert row["bits"] == 32 and not row["ok"]
    assert "wrong word size" in row["note"]
    assert "LD_PRELOAD lists it" in row["note"]  # vgpu-launch's environment for CMD has it


def test_text_output(programs: Programs) -> None:
    """The text report: what is looked for, a table of processes, and the verdict."""
    argv = _traced(programs, "env", "-i", programs.sleeper, "5000")
    with _running(argv, env=clean_env()) as launcher:
        _wait_tree(launcher.pid, 1, [programs.sleeper])
        proc = subprocess.run(
            [str(LAUNCHER), "status", str(launcher.pid), "--preload", programs.libshim],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"looking for: {programs.libshim} (from --preload)"
    assert "PID" in lines[2] and "MAPPED" in lines[2] and "ENVIRON LD_PRELOAD" in lines[2]
    row = next(ln for ln in lines if programs.sleeper in ln)
    assert " yes " in row and "(unset)" in row and "injected at exec" in row
    assert lines[-1] == "status: ok"


def test_nothing_to_look_at(programs: Programs, tmp_path: Path) -> None:
    """No such process, or no library to look for: exit 2, saying which."""
    rc, data, _ = status("999999999", "--preload", programs.libshim)
    assert rc == 2 and "no process" in data["error"]
    empty = tmp_path / "empty.conf"
    empty.write_text("")
    # a process with no vgpu-launch above it and no library configured
    with _running([programs.sleeper, "5000"], env=clean_env()) as p:
        rc, data, _ = status(str(p.pid), env=clean_env({"VGPU_LAUNCH_CONFIG": str(empty)}))
    assert rc == 2 and "no library to look for" in data["error"]


# ---------------------------------------------------------------------------------------------
# --unit: a real cgroup, systemctl faked (a unit under a real systemd: tests/system)


def _cgroup2_root() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


def test_unit_cgroup_finds_escaped_process(programs: Programs, tmp_path: Path) -> None:
    """--unit looks at the unit's whole cgroup and finds a process that escaped."""
    root = _cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup2 hierarchy here")
    cg = f"/vgpu-status-test-{os.getpid()}"
    try:
        os.mkdir(root + cg)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup: {exc}")

    def enter() -> None:
        with open(f"{root}{cg}/cgroup.procs", "w") as f:
            f.write("0")

    systemctl.install(
        tmp_path / "bin",
        {
            "demo.service": {
                "Id": "demo.service",
                "LoadState": "loaded",
                "ActiveState": "active",
                "ControlGroup": cg,
                "ExecStart": f"{{ path={LAUNCHER} ; argv[]={LAUNCHER} --preload "
                f"{programs.libshim} -- sh -c x ; ignore_errors=no ; start_time=[n/a] }}",
            }
        },
    )
    env = clean_env(
        {
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "VGPU_LAUNCH_CONFIG": str(tmp_path / "none.conf"),
        }
    )
    (tmp_path / "none.conf").write_text("")
    argv = _traced(programs, "sh", "-c", f"env -i {programs.sleeper} 6000 & wait")
    try:
        with (
            _running(argv, env=clean_env(), preexec_fn=enter) as launcher,
            _running([programs.sleeper, "6002"], env=clean_env(), preexec_fn=enter) as outside,
        ):
            _wait_tree(launcher.pid, 2, [programs.sleeper])
            rc, data, err = status("--unit", "demo", env=env)
        assert rc == 1, (err, data)
        assert data["libraries"] == [programs.libshim]
        assert "ExecStart of demo" in data["libraries_from"]
        rows = _rows(data)
        assert rows[launcher.pid]["role"] == "launcher"
        assert not rows[outside.pid]["ok"] and "escaped" in rows[outside.pid]["note"]
        assert data["summary"]["missing"] == [outside.pid]
    finally:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.rmdir(root + cg)
                break
            except OSError:
                time.sleep(0.05)


def test_unit_without_systemctl(tmp_path: Path) -> None:
    """--unit without systemctl: exit 2, saying so."""
    (tmp_path / "bin").mkdir()
    env = clean_env({"PATH": str(tmp_path / "bin")})
    proc = subprocess.run(
        [sys.executable, "-m", "vgpu_launch", "status", "--unit", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "systemctl not found" in proc.stderr
