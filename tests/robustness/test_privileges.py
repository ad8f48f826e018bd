"""Programs of another user, setuid programs and file capabilities under a vgpu-launch that
lacks CAP_SYS_PTRACE (a normal user, or root with the capability dropped): nothing is killed
for it, what can be injected is, and what a program lost is a warning that names it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import launch
from support.build import Programs

# vgpu-launch as root, without CAP_SYS_PTRACE in its bounding set (so not in its own sets)
NO_PTRACE_CAP = ["capsh", "--drop=cap_sys_ptrace", "--", "-c", 'exec "$0" "$@"']


def _preload(programs: Programs) -> list[str]:
    return ["--preload", programs.librobustmark]


def _probes(out: str) -> list[dict[str, str]]:
    return [
        dict(kv.split("=", 1) for kv in line.split()[1:])
        for line in out.splitlines()
        if line.startswith("rprobe ")
    ]


@pytest.fixture
def privileged_probes(programs: Programs, pub: Path) -> dict[str, Path]:
    """rprobe copies: setuid root, and with cap_net_raw+ep (a file capability)."""
    if os.geteuid() != 0 or shutil.which("capsh") is None or shutil.which("setcap") is None:
        pytest.fail("needs root and capsh/setcap (apt-get install libcap2-bin)", pytrace=False)
    suid, fcap = pub / "suid-probe", pub / "fcap-probe"
    for target in (suid, fcap):
        shutil.copy(programs.rprobe, target)
        os.chown(target, 0, 0)
    suid.chmod(0o4755)
    fcap.chmod(0o755)
    subprocess.run(["setcap", "cap_net_raw+ep", str(fcap)], check=True)
    return {"suid": suid, "fcap": fcap}


def _exec_of(run: launch.LaunchResult, path: Path) -> dict[str, Any]:
    (ev,) = [e for e in run.of("exec") if e["exe"] == str(path)]
    return ev


@pytest.mark.parametrize("via_shell", [False, True], ids=["setpriv-execs-it", "from-a-shell"])
def test_strict_keeps_setuid_programs_when_root_lacks_cap_sys_ptrace(
    programs: Programs, privileged_probes: dict[str, Path], via_shell: bool
) -> None:
    """Root without CAP_SYS_PTRACE, strict, a tree that switched to nobody running a setuid
    program: /proc/PID/exe and /proc/PID/mem are closed to vgpu-launch, but the program is
    left alone (decision setuid), not killed.

    setpriv execs it still holding CAP_SETUID, so the kernel grants the setuid identity and
    the memory stays closed even to ptrace: the changed ids tell. A shell (no capabilities
    left) execs it without its privilege: its stack, read through ptrace, has AT_SECURE, and
    the warning names what it lost."""
    suid = privileged_probes["suid"]
    cmd = [*launch.NOBODY, "sh", "-c", str(suid)] if via_shell else [*launch.NOBODY, str(suid)]
    run = launch.run(["--strict", *_preload(programs), "--", *cmd], wrap=NO_PTRACE_CAP)
    assert run.returncode == 0, run.describe()
    (probe,) = _probes(run.stdout)
    assert (probe["uid"], probe["secure"]) == ("65534", "1")
    ev = _exec_of(run, suid)
    assert ev["decision"] == "setuid", run.describe()
    if via_shell:
        assert probe["euid"] == "65534"
        assert (ev["level"], ev["lost"]) == ("warning", ["setuid root"]), run.describe()
    else:
        assert probe["euid"] == "0"
        assert ev["level"] == "info" and "closed to vgpu-launch" in ev["note"], run.describe()
    assert run.end["counts"]["failed"] == 0


def test_programs_of_another_user_get_the_preload_without_cap_sys_ptrace(
    programs: Programs,
) -> None:
    """Root without CAP_SYS_PTRACE, strict, a tree that switched to nobody: a program started
    with an empty environment is injected through ptrace itself (/proc/PID/mem is refused)
    and loads the preload, instead of being killed."""
    run = launch.run(
        ["--strict", *_preload(programs), "--", *launch.NOBODY, "env", "-i", programs.rprobe],
        wrap=NO_PTRACE_CAP,
    )
    assert run.returncode == 0, run.describe()
    (probe,) = _probes(run.stdout)
    assert (probe["uid"], probe["marker"], probe["LD_PRELOAD"]) == (
        "65534",
        "1",
        programs.librobustmark,
    )
    ev = _exec_of(run, Path(programs.rprobe))
    assert ev["decision"] == "injected" and ev["level"] == "info", run.describe()
    assert "exe not readable" in ev["note"]
    assert run.end["counts"]["failed"] == 0


@pytest.mark.parametrize(("probe", "lost"), [("suid", ["setuid root"]), ("fcap", ["cap_net_raw"])])
def test_unprivileged_vgpu_launch_names_what_a_program_lost(
    programs: Programs, privileged_probes: dict[str, Path], probe: str, lost: list[str]
) -> None:
    """vgpu-launch as nobody: a setuid-root program runs as nobody and a program with
    cap_net_raw+ep without it (the kernel grants nothing through an unprivileged tracer); the
    exec event is a warning naming the program and what it lost."""
    path = privileged_probes[probe]
    run = launch.run([*_preload(programs), "--", str(path)], user="nobody")
    assert run.returncode == 0, run.describe()
    (out,) = _probes(run.stdout)
    assert out["euid"] == "65534"
    ev = _exec_of(run, path)
    assert (ev["level"], ev["lost"]) == ("warning", lost), run.describe()
    assert "CAP_SYS_PTRACE" in ev["action"]


def test_nothing_lost_under_a_privileged_vgpu_launch(
    programs: Programs, privileged_probes: dict[str, Path]
) -> None:
    """Root with CAP_SYS_PTRACE: the setuid program gets its privilege, the one with a file
    capability gets it too; no warning."""
    script = f"{privileged_probes['suid']}; {privileged_probes['fcap']}"
    run = launch.run([*_preload(programs), "--", *launch.NOBODY, "sh", "-c", script])
    assert run.returncode == 0, run.describe()
    suid, fcap = _probes(run.stdout)
    assert (suid["euid"], fcap["euid"]) == ("0", "65534")
    assert [e for e in run.events if e["level"] == "warning"] == [], run.describe()
    assert all("lost" not in e for e in run.of("exec"))


def test_no_new_privs_is_not_blamed_on_vgpu_launch(
    programs: Programs, privileged_probes: dict[str, Path]
) -> None:
    """With no_new_privs (NoNewPrivileges=yes) the kernel ignores the setuid bit for everyone:
    the program is an ordinary one (it keeps the preload), and nothing is reported lost."""
    suid = privileged_probes["suid"]
    run = launch.run(
        [*_preload(programs), "--", "setpriv", "--no-new-privs", str(suid)], user="nobody"
    )
    assert run.returncode == 0, run.describe()
    (probe,) = _probes(run.stdout)
    assert (probe["euid"], probe["secure"], probe["marker"]) == ("65534", "0", "1")
    ev = _exec_of(run, suid)
    assert ev["decision"] == "present" and "lost" not in ev, run.describe()
