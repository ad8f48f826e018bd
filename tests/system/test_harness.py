"""The booted system itself: systemd runs units in it, and it leaves the machine untouched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.systemd

SLEEPER = """\
[Unit]
Description=sleeps until stopped

[Service]
ExecStart=/bin/sh -c 'echo sleeper-started; exec /bin/sleep infinity'
KillMode=mixed
"""


def test_boots_and_runs_a_unit(
    boot_system: Callable[..., harness.BootedSystem], tmp_path: Path
) -> None:
    """A booted system runs systemd and a unit, and leaves the machine as it was."""
    sentinel = Path("/tmp") / f"vgpu-launch-system-test-{os.getpid()}"
    sentinel.write_text("untouched")
    dev_before = set(os.listdir("/dev"))
    hostname = socket.gethostname()
    t0 = time.monotonic()
    try:
        with boot_system() as system:
            boot_s = time.monotonic() - t0
            assert system.run("systemctl", "is-system-running", check=False).stdout.strip() in (
                "running",
                "degraded",
            )
            assert system.run("hostname").stdout.strip() == "vgpu-launch-test"
            assert system.run("cat", "/proc/1/comm").stdout.strip() == "systemd"

            system.write("/etc/systemd/system/sleeper.service", SLEEPER)
            system.systemctl("daemon-reload")
            system.systemctl("start", "sleeper.service")
            props = system.show("sleeper.service", "ActiveState", "MainPID")
            assert props["ActiveState"] == "active"
            main_pid = int(props["MainPID"])
            assert any(p["pid"] == main_pid and p["comm"] == "sleep" for p in system.processes())
            harness.wait_for(
                "the unit's output in the journal",
                lambda: any(
                    e.get("MESSAGE") == "sleeper-started"
                    for e in system.journal("-u", "sleeper.service")
                ),
                timeout=10,
            )

            system.systemctl("stop", "sleeper.service")
            props = system.show("sleeper.service", "ActiveState", "Result")
            assert props == {"ActiveState": "inactive", "Result": "success"}
            assert not any(p["comm"] == "sleep" for p in system.processes())
            init_pid = system.init_pid
            cgroup = system._cgroup
        # torn down: the namespace's init is gone with everything it ran
        assert init_pid is not None and not Path(f"/proc/{init_pid}").exists()
        assert not cgroup.exists()
    finally:
        text = sentinel.read_text()
        sentinel.unlink()
    print(f"boot took {boot_s:.1f} s")
    # the machine is untouched
    assert text == "untouched"
    assert set(os.listdir("/dev")) == dev_before
    assert socket.gethostname() == hostname


def test_teardown_kills_everything_even_on_error(
    boot_system: Callable[..., harness.BootedSystem],
) -> None:
    """A test failing midway still kills every process of its system."""
    with pytest.raises(RuntimeError), boot_system() as system:
        system.run("systemd-run", "--unit=stray", "/bin/sleep", "infinity")
        stray = [p["pid"] for p in system.processes() if p["comm"] == "sleep"]
        assert stray
        init_pid = system.init_pid
        raise RuntimeError("test failed midway")
    assert init_pid is not None and not Path(f"/proc/{init_pid}").exists()


def test_namespace_dies_with_the_test_process(bookworm_root: Path, tmp_path: Path) -> None:
    """A test run killed outright (SIGKILL, no teardown) still takes its system with it."""
    script = (
        "import sys, time\n"
        f"sys.path[:0] = [{str(Path(harness.__file__).parent)!r}, "
        f"{str(Path(harness.__file__).parents[1])!r}]\n"
        "import harness\n"
        f"s = harness.BootedSystem(harness.Path({str(bookworm_root)!r}), "
        f"log_dir=harness.Path({str(tmp_path)!r}))\n"
        "s.boot()\n"
        "print(s.init_pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        init_pid = int(child.stdout.readline())
        assert Path(f"/proc/{init_pid}").exists()
        child.kill()
        child.wait(timeout=10)
        harness.wait_for(
            "the namespace's init to die", lambda: not harness._alive(init_pid), timeout=10
        )
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        base = harness.cgroup2_mount()
        if base is not None:
            harness.remove_stale_cgroups(base)
            assert not list(base.glob(f"vgpu-launch-test.{child.pid}.*"))
