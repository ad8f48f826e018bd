"""End to end, under a real systemd on a clean Debian 12: the packaged vgpu-launch wrapping an
ollama-like service the way an operator enables it.

One system is booted for the module; the package is installed with apt-get, the ollama-like
example (examples/ollama-like) is installed where ollama's installer puts ollama, with a unit
like ollama's official one, and the drop-in is enabled with the lines of docs/install.md.
The tests run in file order and each leaves the unit running for the next, except the last two
(package removal and purge).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness
import pytest

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
UNIT = "ollama.service"
OLLAMA = "/usr/local/bin/ollama"
SHIM = "/usr/local/lib/vgpu-test/libvgpu-test-shim.so"
LIBCUDA = "/usr/lib/x86_64-linux-gnu/libcuda.so.1"  # where a driver's library lives
DROPIN_LINK = "/etc/systemd/system/ollama.service.d/vgpu-launch.conf"
DROPIN_TARGET = "/usr/share/vgpu-launch/systemd/ollama.service.d/vgpu-launch.conf"

# ollama's official unit, as its install.sh writes it (PATH is the installer's own)
OLLAMA_UNIT = """\
[Unit]
Description=Ollama Service
After=network-online.target

[Service]
ExecStart=/usr/local/bin/ollama serve
User=ollama
Group=ollama
Restart=always
RestartSec=3
Environment="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

[Install]
WantedBy=default.target
"""

CONFIG = f"""\
preload = ["{SHIM}"]
"""


def enable_lines() -> str:
    """The shell lines docs/install.md gives to enable vgpu-launch for ollama."""
    text = (REPO / "docs" / "install.md").read_text()
    m = re.search(r"<!-- enable-ollama[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert m, "docs/install.md lost its enable-ollama block"
    return m[1]


# --- helpers --------------------------------------------------------------------------------


def invocation(system: harness.BootedSystem) -> str:
    return system.show(UNIT, "InvocationID")["InvocationID"]


def messages(system: harness.BootedSystem, invocation_id: str) -> list[str]:
    """What the processes of one run of the unit wrote (stdout/stderr), in order."""
    entries = system.journal(f"_SYSTEMD_INVOCATION_ID={invocation_id}")
    return [e["MESSAGE"] for e in entries if isinstance(e.get("MESSAGE"), str)]


def events(system: harness.BootedSystem, invocation_id: str) -> list[dict[str, Any]]:
    """vgpu-launch's JSON log lines of one run of the unit."""
    out = []
    for message in messages(system, invocation_id):
        if message.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(message))
    return out


def initial_count(system: harness.BootedSystem, invocation_id: str, timeout: float = 30) -> int:
    """The ``initial_count=N`` that ollama logs after its GPU discovery, in that run."""

    def find() -> int | None:
        for message in messages(system, invocation_id):
            m = re.search(r"\binitial_count=(\d+)", message)
            if m:
                return int(m[1]) + 1  # +1: 0 is a valid count but not a true value
        return None

    found = harness.wait_for(
        "initial_count in the journal",
        find,
        timeout,
        describe=lambda: system.journal_text("-u", UNIT, "-n", "80"),
    )
    return found - 1


def runner_counts(system: harness.BootedSystem, invocation_id: str) -> list[int]:
    return [
        int(m[1])
        for msg in messages(system, invocation_id)
        if (m := re.search(r"\brunner pid=\d+ port=\d+ count=(\d+)", msg))
    ]


def wait_active(
    system: harness.BootedSystem, *, other_than: str | None = None, timeout: float = 30
) -> str:
    """Wait until the unit is active (in a run other than ``other_than``); its InvocationID."""

    def ready() -> str | None:
        props = system.show(UNIT, "ActiveState", "SubState", "InvocationID")
        if (
            props["ActiveState"] == "active"
            and props["SubState"] == "running"
            and props["InvocationID"]
            and props["InvocationID"] != other_than
        ):
            return props["InvocationID"]
        return None

    return harness.wait_for(
        f"{UNIT} active",
        ready,
        timeout,
        describe=lambda: system.journal_text("-u", UNIT, "-n", "60"),
    )


def ollama_processes(system: harness.BootedSystem) -> list[dict[str, Any]]:
    return [p for p in system.processes() if p["argv"][:1] == [OLLAMA]]


def launcher_processes(system: harness.BootedSystem) -> list[dict[str, Any]]:
    return [
        p
        for p in system.processes()
        if any(a.endswith("vgpu-launch") or a == "vgpu_launch" for a in p["argv"][:4])
    ]


# --- the system -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def system(
    boot_system: Callable[..., harness.BootedSystem], deb_package: Path, ollama_like: Any
) -> Iterator[harness.BootedSystem]:
    t0 = time.monotonic()
    with boot_system() as system:
        harness.install_deb(system, deb_package)
        # the ollama-like server where ollama's installer puts ollama, the fake driver where a
        # driver's libcuda lives, the shim somewhere root owns
        system.copy_in(Path(ollama_like.ollama), OLLAMA, 0o755)
        system.copy_in(Path(ollama_like.libcuda), LIBCUDA, 0o644)
        system.copy_in(Path(ollama_like.shim), SHIM, 0o644)
        system.run("ldconfig")
        system.run(
            "useradd", "-r", "-s", "/bin/false", "-U", "-m", "-d", "/usr/share/ollama", "ollama"
        )
        system.write("/etc/systemd/system/ollama.service", OLLAMA_UNIT)
        system.write("/etc/vgpu-launch/vgpu-launch.conf", CONFIG)
        system.systemctl("daemon-reload")
        system.systemctl("enable", UNIT)
        # what the operator types (docs/install.md)
        system.run("/bin/sh", "-ec", enable_lines(), timeout=60)
        print(f"system with package, fixture and unit ready in {time.monotonic() - t0:.0f} s")
        yield system


# --- the tests, in order --------------------------------------------------------------------


def test_unit_runs_under_vgpu_launch(system: harness.BootedSystem) -> None:
    """The drop-in makes ollama's unit start the server under vgpu-launch, nothing else."""
    wait_active(system)
    props = system.show(UNIT, "ExecStart", "KillMode", "DropInPaths", "User", "Restart")
    assert DROPIN_LINK in props["DropInPaths"].split()
    assert "path=/usr/bin/vgpu-launch" in props["ExecStart"]
    assert "/usr/local/bin/ollama serve" in props["ExecStart"]
    assert props["KillMode"] == "mixed"
    # the drop-in changes nothing else of ollama's unit
    assert props["User"] == "ollama" and props["Restart"] == "always"
    main_pid = int(system.show(UNIT, "MainPID")["MainPID"])
    servers = harness.wait_for(
        "ollama serve started by vgpu-launch",
        lambda: [p for p in ollama_processes(system) if p["argv"][1:2] == ["serve"]],
        timeout=15,
        describe=lambda: system.journal_text("-u", UNIT, "-n", "40"),
    )
    assert [p["ppid"] for p in servers] == [main_pid], servers
    assert all(p["uid"] != 0 for p in servers)
    launcher = [p for p in system.processes() if p["pid"] == main_pid]
    # vgpu-launch runs on Debian's python3 (the package pins it), whatever PATH the unit sets
    assert launcher and launcher[0]["argv"][0] == "/usr/bin/python3", launcher


def test_runners_report_the_virtual_device(system: harness.BootedSystem) -> None:
    """Every runner of the ollama-like server sees the shim's device."""
    run = wait_active(system)
    assert initial_count(system, run) == 1, system.journal_text("-u", UNIT, "-n", "80")
    counts = runner_counts(system, run)
    assert counts and all(c == 1 for c in counts), counts


def test_decision_log_is_structured_in_the_journal(system: harness.BootedSystem) -> None:
    """The decisions are JSON lines in the unit's journal, runners injected."""
    run = wait_active(system)
    initial_count(system, run)
    log = events(system, run)
    execs = [e for e in log if e.get("event") == "exec"]
    assert execs, "no exec decisions in the journal:\n" + "\n".join(messages(system, run)[-40:])
    runners = [e for e in execs if "runner" in (e.get("argv") or [])]
    assert len(runners) >= 4, execs  # discovery starts four runners
    # the runners are started without LD_PRELOAD; vgpu-launch puts the shim back
    assert all(SHIM in (e.get("preload_after") or "") for e in runners), runners
    # every line of the log is a journal entry of the unit, attributed to vgpu-launch
    entries = [
        e
        for e in system.journal(f"_SYSTEMD_INVOCATION_ID={run}")
        if isinstance(e.get("MESSAGE"), str) and e["MESSAGE"].startswith('{"')
    ]
    assert entries
    assert all(
        e.get("_SYSTEMD_UNIT") == UNIT and e.get("SYSLOG_IDENTIFIER") == "vgpu-launch"
        for e in entries
    ), entries[:3]


def test_journal_fields_select_the_decisions(system: harness.BootedSystem) -> None:
    """journalctl -u ollama VGPU_LAUNCH_EVENT=exec (and VGPU_LAUNCH_DECISION=injected) select
    vgpu-launch's decisions by journal field; -o json has every field, priority per level."""
    run = wait_active(system)
    initial_count(system, run)
    execs = [
        e
        for e in system.journal("-u", "ollama", "VGPU_LAUNCH_EVENT=exec")
        if e.get("_SYSTEMD_INVOCATION_ID") == run
    ]
    assert execs, system.journal_text("-u", UNIT, "-n", "40")
    assert all(json.loads(e["MESSAGE"])["event"] == "exec" for e in execs)
    assert all(e["PRIORITY"] == "6" and e["SYSLOG_IDENTIFIER"] == "vgpu-launch" for e in execs)
    injected = [
        e
        for e in system.journal("-u", "ollama", "VGPU_LAUNCH_DECISION=injected")
        if e.get("_SYSTEMD_INVOCATION_ID") == run
    ]
    runners = [e for e in injected if "runner" in json.loads(e["VGPU_LAUNCH_ARGV"])]
    assert len(runners) >= 4, injected  # discovery starts four runners
    assert all(
        e["VGPU_LAUNCH_EVENT"] == "exec" and SHIM in e["VGPU_LAUNCH_PRELOAD_AFTER"] for e in runners
    ), runners[:2]
    # the service's own lines are not selected
    assert not any("initial_count" in e["MESSAGE"] for e in execs + injected)


def test_status_shows_every_process_with_the_shim(system: harness.BootedSystem) -> None:
    """`vgpu-launch status --unit ollama` shows every process with the shim."""
    wait_active(system)
    proc = system.run("vgpu-launch", "status", "--unit", "ollama", "--format", "json", check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    by_pid: dict[int, Any] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("pid"), int):
                by_pid[node["pid"]] = node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(report)
    for server in ollama_processes(system):
        assert server["pid"] in by_pid, (server, report)
        assert SHIM in json.dumps(by_pid[server["pid"]]), by_pid[server["pid"]]


def test_stop_is_clean(system: harness.BootedSystem) -> None:
    """`systemctl stop`: the server shuts down on its own, nothing left, result success."""
    run = wait_active(system)
    initial_count(system, run)  # discovery over
    t0 = time.monotonic()
    system.systemctl("stop", UNIT, timeout=60)
    took = time.monotonic() - t0
    props = system.show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props["ActiveState"] == "inactive"
    assert props["Result"] == "success", props
    assert took < 20, f"stop took {took:.1f} s: SIGTERM did not end the service"
    assert ollama_processes(system) == []  # the server and every runner are gone
    assert launcher_processes(system) == []
    # SIGTERM reached the server once: it shut down on its own
    assert any("shutting down" in m for m in messages(system, run))
    system.systemctl("start", UNIT)
    assert initial_count(system, wait_active(system)) == 1


def test_crash_is_a_failure_and_is_restarted(system: harness.BootedSystem) -> None:
    """The server crashing is a failure to systemd, and the unit is restarted."""
    run = wait_active(system)
    initial_count(system, run)  # the server is up and done with discovery
    before = system.show(UNIT, "NRestarts", "MainPID")
    servers = [p for p in ollama_processes(system) if p["argv"][1:2] == ["serve"]]
    assert len(servers) == 1, servers
    system.run("/bin/sh", "-c", f"kill -SEGV {servers[0]['pid']}")
    # systemd sees the main process fail as the server did, and restarts the unit
    new_run = wait_active(system, other_than=run, timeout=30)
    after = system.show(UNIT, "NRestarts")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    end = [e for e in events(system, run) if e.get("event") == "end"]
    unit_log = system.journal_text("-u", UNIT)
    # A Go program turns a SIGSEGV into a crash report and exit status 2; vgpu-launch passes
    # that on (a C program would die of the signal, and vgpu-launch with it).
    if end and end[0].get("cmd_exit") is not None:
        status = int(end[0]["cmd_exit"])
        assert status != 0, end
        assert f"Main process exited, code=exited, status={status}/" in unit_log, unit_log[-3000:]
        assert "Failed with result 'exit-code'" in unit_log, unit_log[-3000:]
    else:
        assert re.search(r"Main process exited, code=(killed|dumped), status=11/SEGV", unit_log), (
            unit_log[-3000:]
        )
        assert re.search(r"Failed with result '(signal|core-dump)'", unit_log), unit_log[-3000:]
    assert "Scheduled restart job" in unit_log, unit_log[-3000:]
    assert initial_count(system, new_run) == 1


def test_remove_leaves_the_unit_working_without_the_dropin(system: harness.BootedSystem) -> None:
    """Removing the package leaves ollama running on its own ExecStart."""
    run = wait_active(system)
    initial_count(system, run)
    system.apt_get("remove", "vgpu-launch")
    # the package restarted the service; it runs ollama's own ExecStart now
    new_run = wait_active(system, other_than=run, timeout=30)
    props = system.show(UNIT, "ExecStart", "MainPID")
    # (systemd still lists the dangling drop-in in DropInPaths, but reads nothing from it)
    assert "vgpu-launch" not in props["ExecStart"]
    main = [p for p in system.processes() if p["pid"] == int(props["MainPID"])]
    assert main and main[0]["argv"] == [OLLAMA, "serve"], main
    # without vgpu-launch the runners are back to seeing no device
    assert initial_count(system, new_run) == 0
    # the operator's link stays, dangling (docs/install.md)
    assert system.run("readlink", DROPIN_LINK).stdout.strip() == DROPIN_TARGET
    assert not system.exists(DROPIN_LINK)


def test_purge_removes_the_dangling_link(system: harness.BootedSystem) -> None:
    """Purging removes the dangling drop-in link and the configuration."""
    system.apt_get("purge", "vgpu-launch")
    assert system.run("test", "-L", DROPIN_LINK, check=False).returncode != 0
    assert not system.exists("/etc/systemd/system/ollama.service.d")
    assert not system.exists("/etc/vgpu-launch")
    assert system.show(UNIT, "ActiveState")["ActiveState"] == "active"
