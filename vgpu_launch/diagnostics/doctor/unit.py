"""A systemd unit that runs vgpu-launch: ExecStart, KillMode, NotifyAccess, and the sandbox
settings that decide whether tracing and the preload work in it."""

from __future__ import annotations

import os
import shutil

from ..effective import launcher_argv
from ..systemd import Unit
from .configuration import hide_values
from .result import FAIL, OK, WARN, Checks


def check_unit(
    checks: Checks, unit: Unit, libs: dict[str, str] | None = None, show_values: bool = False
) -> None:
    """``libs``: preload library -> a file it expands to, for the sandbox settings;
    ``show_values``: show --env/--force-env values in ExecStart (else only their names)."""
    u = f"unit {unit.name}"
    frag = unit.get("FragmentPath") or "(no unit file)"
    checks.add(OK, u, f"{unit.get('LoadState', '?')}, {unit.get('ActiveState', '?')}, from {frag}")
    drop = unit.get("DropInPaths").split()
    checks.add(OK, f"{u}: drop-ins", " ".join(drop) if drop else "none")

    cmds = unit.exec_start
    runs = [c for c in cmds if launcher_argv(c) is not None]
    if not cmds:
        checks.add(FAIL, f"{u}: ExecStart", "no ExecStart", "")
    elif runs:
        argv = runs[0]
        exe = argv[0]
        usable = os.access(exe, os.X_OK) if exe.startswith("/") else shutil.which(exe)
        if usable:
            args = launcher_argv(argv) or []
            shown = argv if show_values else [*argv[: len(argv) - len(args)], *hide_values(args)]
            checks.add(OK, f"{u}: ExecStart", " ".join(shown))
        else:
            checks.add(
                FAIL,
                f"{u}: ExecStart",
                f"{exe} is not executable here",
                "install vgpu-launch or correct the path in ExecStart",
            )
        shell = os.path.basename(exe) in ("sh", "bash", "dash")
        if shell:
            checks.add(
                WARN,
                f"{u}: ExecStart",
                "vgpu-launch is started through a shell: it must "
                "be exec'd (exec vgpu-launch ...) to be the main process",
                "put vgpu-launch first in ExecStart",
            )
    else:
        checks.add(
            FAIL,
            f"{u}: ExecStart",
            f"runs {' '.join(cmds[0])}, not vgpu-launch",
            f"add a drop-in (systemctl edit {unit.name}): [Service] ExecStart= and "
            f"ExecStart=/usr/bin/vgpu-launch -- {' '.join(cmds[0])}",
        )

    km = unit.get("KillMode", "control-group")
    if km == "mixed":
        checks.add(
            OK,
            f"{u}: KillMode",
            "mixed: SIGTERM to vgpu-launch only (it forwards it "
            "once), SIGKILL to the whole cgroup at the end",
        )
    else:
        why = {
            "control-group": "SIGTERM goes to vgpu-launch and to CMD directly: CMD sees it "
            "twice (a Go server may take the second as 'force quit')",
            "process": "only vgpu-launch is killed: the rest of the tree survives a stop",
            "none": "nothing is killed on stop",
        }.get(km, f"KillMode={km}")
        checks.add(WARN, f"{u}: KillMode", f"{km}: {why}", "set KillMode=mixed in a drop-in")

    typ = unit.get("Type", "simple")
    na = unit.get("NotifyAccess", "none")
    if typ.startswith("notify"):
        if na == "all":
            checks.add(
                OK, f"{u}: NotifyAccess", f"all (Type={typ}): CMD's sd_notify reaches systemd"
            )
        else:
            checks.add(
                FAIL,
                f"{u}: NotifyAccess",
                f"{na} with Type={typ}: systemd drops CMD's "
                "READY=1 (CMD is not the main process) and the start times out",
                "set NotifyAccess=all in a drop-in",
            )
    else:
        checks.add(OK, f"{u}: NotifyAccess", f"{na} (Type={typ}: not used)")

    check_hardening(checks, unit, libs)


def _syscall_filter(value: str) -> tuple[bool, set[str]]:
    """(deny-list?, the syscall names) of a shown SystemCallFilter=."""
    deny = value.startswith("~")
    names = {n.split(":")[0] for n in value.lstrip("~").split()}
    return deny, names


def _hidden_by_sandbox(unit: Unit, file: str) -> tuple[str, str] | None:
    """(setting, value) of a unit setting that hides ``file`` from the service."""
    real = os.path.realpath(file)
    home = unit.get("ProtectHome", "no")
    if home in ("yes", "tmpfs") and any(
        real == d or real.startswith(d + "/") for d in ("/home", "/root", "/run/user")
    ):
        return "ProtectHome", home
    if unit.flag("PrivateTmp") and any(real.startswith(d + "/") for d in ("/tmp", "/var/tmp")):
        return "PrivateTmp", "yes"
    return None


def check_hardening(checks: Checks, unit: Unit, libs: dict[str, str] | None = None) -> None:
    libs = libs or {}
    u = f"unit {unit.name}"
    root_unit = (unit.get("User") or "root") in ("root", "0")
    scf = unit.get("SystemCallFilter")
    if scf.lstrip("~").strip():
        deny, names = _syscall_filter(scf)
        blocked = ("ptrace" in names) if deny else ("ptrace" not in names)
        if blocked:
            err = unit.get("SystemCallErrorNumber") or "SIGSYS"
            checks.add(
                FAIL,
                f"{u}: SystemCallFilter",
                f"ptrace is {'denied' if deny else 'not in the allow-list'} (fails with "
                f"{err}): vgpu-launch exits 125 'cannot trace'",
                "add SystemCallFilter=ptrace in a drop-in (after the other "
                "SystemCallFilter= lines; @system-service does not include it)",
            )
        else:
            checks.add(OK, f"{u}: SystemCallFilter", "allows ptrace")
    else:
        checks.add(OK, f"{u}: SystemCallFilter", "none")

    checks.add(
        OK,
        f"{u}: NoNewPrivileges",
        f"{unit.get('NoNewPrivileges', 'no')}: does not affect ptrace of one's own children"
        + (
            " (and setuid programs then run unprivileged, so they do get the preload)"
            if unit.flag("NoNewPrivileges")
            else ""
        ),
    )

    cbs = unit.get("CapabilityBoundingSet")
    if cbs and root_unit and "cap_sys_ptrace" not in cbs.lower().split():
        checks.add(
            WARN,
            f"{u}: CapabilityBoundingSet",
            "lacks CAP_SYS_PTRACE in a unit running as root: tracing the tree works, but "
            "processes that switch to another user (setuid(), setpriv) cannot be "
            "rewritten and run without the preload",
            "add CAP_SYS_PTRACE to CapabilityBoundingSet= if the service drops privileges "
            "in child processes",
        )
    else:
        checks.add(
            OK,
            f"{u}: CapabilityBoundingSet",
            "does not matter for tracing the unit's own processes"
            + ("" if root_unit else " (a non-root unit has no capabilities anyway)"),
        )

    checks.add(
        OK,
        f"{u}: ProtectKernelTunables",
        f"{unit.get('ProtectKernelTunables', 'no')}: does not matter (it makes /proc/sys "
        "read-only; vgpu-launch only reads it)",
    )

    if unit.flag("PrivateDevices"):
        checks.add(
            WARN,
            f"{u}: PrivateDevices",
            "yes: /dev/nvidia* are hidden from the service, CUDA will find no GPU",
            "set PrivateDevices=no (or DeviceAllow= the GPU devices)",
        )
    if unit.get("ProtectProc") == "invisible" and root_unit:
        checks.add(
            WARN,
            f"{u}: ProtectProc",
            "invisible: processes that switch to another user vanish from vgpu-launch's "
            "/proc and cannot be rewritten",
            "set ProtectProc=default",
        )
    if unit.get("SystemCallArchitectures") == "native":
        checks.add(
            OK,
            f"{u}: SystemCallArchitectures",
            "native: 32-bit programs cannot run in this unit at all",
        )
    if unit.get("AppArmorProfile"):
        checks.add(
            WARN,
            f"{u}: AppArmorProfile",
            f"{unit.get('AppArmorProfile')}: the profile must allow ptrace (trace) of the "
            "unit's own processes",
            "check the profile for a ptrace rule",
        )
    for lib, file in libs.items():
        hidden = _hidden_by_sandbox(unit, file)
        if hidden:
            shown = file if file == lib else f"{file} ({lib})"
            checks.add(
                FAIL,
                f"{u}: {hidden[0]}",
                f"{hidden[1]}: the service cannot see {shown}, "
                "so no process of it loads the preload",
                "install the library under /usr or /opt (or relax the setting)",
            )
    if unit.flag("DynamicUser"):
        checks.add(
            WARN,
            f"{u}: DynamicUser",
            "yes: the service user exists only while it runs; library permissions cannot "
            "be checked for it here",
            "make the library world-readable",
        )
