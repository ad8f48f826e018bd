"""Can vgpu-launch trace here? A child is traced through an exec the way vgpu-launch
does it, and what could refuse it (Yama, seccomp, a tracer above, capabilities) is named."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import signal
import sys
import time
from typing import Any

from ... import arch, procfs
from ...launchers import traced_by_hint
from ...trace import probe
from ...trace import ptracelib as pt
from ..systemd import Unit
from .result import FAIL, NOTE, OK, WARN, Checks

CAP_SYS_PTRACE = 19


def _yama() -> str | None:
    return procfs.yama_ptrace_scope()


def _has_cap(cap: int, field: str = "CapEff", pid: int | str = "self") -> bool:
    value = procfs.status_field(pid, field)
    try:
        return bool(int(value or "0", 16) >> cap & 1)
    except ValueError:
        return False


def _true_program() -> list[str]:
    for path in ("/bin/true", "/usr/bin/true"):
        if os.access(path, os.X_OK):
            return [path]
    return [sys.executable, "-c", ""]


def trace_child() -> tuple[bool, str, dict[str, Any]]:
    """Trace a child of ours the way vgpu-launch does: PTRACE_SEIZE, its exec stop, its
    registers, /proc/PID/mem opened for writing. (worked, what happened, facts for the why)."""
    facts: dict[str, Any] = {}
    program = _true_program()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(w)
            if os.read(r, 1) == b"g":
                os.execv(program[0], program)
        finally:
            os._exit(0)
    os.close(r)
    try:
        err = pt.try_seize(pid, pt.PTRACE_O_TRACEEXEC | pt.PTRACE_O_EXITKILL)
        if err:
            facts["errno"] = errno.errorcode.get(err, str(err))
            tracer = procfs.status_field(pid, "TracerPid")
            if tracer and tracer != "0":
                facts["child_tracer"] = int(tracer)
            return False, f"PTRACE_SEIZE of a child failed ({facts['errno']})", facts
        os.write(w, b"g")
        os.close(w)
        w = -1
        status = _wait(pid, 5.0)
        if status is None:
            return False, "the traced child did not reach its exec stop within 5 s", facts
        if status & 0xFF != 0x7F or status >> 16 != pt.PTRACE_EVENT_EXEC:
            return False, f"the traced child stopped unexpectedly (wait status {status:#x})", facts
        steps = ["PTRACE_SEIZE", "exec stop"]
        try:
            arch.current().read_sp(pid)
            steps.append("registers")
            fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            os.close(fd)
            steps.append("/proc/PID/mem")
        except (OSError, pt.PtraceError) as exc:
            return False, f"{', '.join(steps)} worked, then: {exc}", facts
        pt.cont(pid, 0)
        return True, f"a child was traced through its exec ({', '.join(steps)})", facts
    finally:
        if w >= 0:
            os.close(w)
        _reap(pid)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got, status = os.waitpid(pid, os.WNOHANG | pt.WALL)
        except ChildProcessError:
            return None
        if got == pid:
            return status
        time.sleep(0.002)
    return None


def _reap(pid: int) -> None:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            got, status = os.waitpid(pid, os.WNOHANG | pt.WALL)
        except ChildProcessError:
            return
        if got == pid and status & 0xFF != 0x7F:
            return
        if got == pid:  # a ptrace stop: let it go on
            with contextlib.suppress(pt.PtraceError):
                pt.cont(pid, 0)
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.002)


def check_ptrace(checks: Checks, unit: Unit | None) -> None:
    if probe.filtered():
        # A seccomp filter may kill whoever calls ptrace: ask a throw-away child first.
        found = probe.probe(pt.FOLLOW | pt.PTRACE_O_EXITKILL)
        if found.killed_by:
            where = " (in this shell; the unit's own sandbox is checked below)" if unit else ""
            checks.add(
                FAIL,
                "ptrace",
                f"PTRACE_SEIZE: {found.reason}{where}",
                "vgpu-launch would exit 125 with this reason",
            )
            return
    worked, what, facts = trace_child()
    yama = _yama()
    seccomp = procfs.status_field("self", "Seccomp") or "0"
    tracer = procfs.status_field("self", "TracerPid") or "0"
    has_cap = _has_cap(CAP_SYS_PTRACE)
    where = " (in this shell; the unit's own sandbox is checked below)" if unit else ""

    if worked:
        checks.add(OK, "ptrace", what + where)
    else:
        why, fix = _ptrace_diagnosis(facts, yama, seccomp, tracer, has_cap)
        checks.add(FAIL, "ptrace", f"{what}: {why}{where}", fix)

    if yama is None:
        checks.add(OK, "ptrace: yama", "Yama is not active (no kernel.yama.ptrace_scope)")
    elif yama in ("0", "1"):
        checks.add(
            OK,
            "ptrace: yama",
            f"kernel.yama.ptrace_scope = {yama}: a process may trace its own children",
        )
    elif yama == "2":
        checks.add(
            OK if has_cap else FAIL,
            "ptrace: yama",
            "kernel.yama.ptrace_scope = 2: only processes with CAP_SYS_PTRACE may trace"
            + ("" if has_cap else ", and this one lacks it"),
            ""
            if has_cap
            else "run vgpu-launch with CAP_SYS_PTRACE (AmbientCapabilities="
            "CAP_SYS_PTRACE in the unit), or set kernel.yama.ptrace_scope=1",
        )
    else:
        checks.add(
            FAIL,
            "ptrace: yama",
            f"kernel.yama.ptrace_scope = {yama}: ptrace is disabled until reboot",
            "boot without that setting (sysctl kernel.yama.ptrace_scope cannot be lowered from 3)",
        )

    if seccomp == "2":
        checks.add(
            OK if worked else FAIL,
            "ptrace: seccomp",
            "a seccomp filter is active on this process"
            + (" and lets ptrace through" if worked else " and refuses ptrace"),
            ""
            if worked
            else "allow ptrace in the filter (a container runtime's profile: "
            "docker --security-opt seccomp=... or a profile that allows ptrace)",
        )
    else:
        checks.add(OK, "ptrace: seccomp", f"no seccomp filter on this process (Seccomp: {seccomp})")

    if tracer != "0":
        name = procfs.comm(tracer)
        checks.add(
            FAIL if not worked else WARN,
            "ptrace: tracer",
            f"this process is traced by pid {tracer} ({name}){traced_by_hint(tracer)}"
            + (": a tracer that follows forks takes every child first" if not worked else ""),
            f"run vgpu-launch outside {name} (or trace vgpu-launch without following its children)",
        )
    else:
        checks.add(OK, "ptrace: tracer", "this process is not traced (TracerPid 0)")

    checks.add(
        OK,
        "ptrace: capabilities",
        ("CAP_SYS_PTRACE present" if has_cap else "CAP_SYS_PTRACE absent")
        + ": not needed to trace one's own children; needed only with "
        "kernel.yama.ptrace_scope = 2, or to reach children that switch to another user",
    )
    check_setuid(checks, unit, has_cap)


def _unit_has_ptrace_cap(unit: Unit) -> tuple[str, bool]:
    """(the unit's user, whether vgpu-launch gets CAP_SYS_PTRACE there): root keeps it unless
    CapabilityBoundingSet= drops it; another user has it only through AmbientCapabilities=."""
    user = unit.get("User") or "root"
    bounding = unit.get("CapabilityBoundingSet").lower().split()
    ambient = unit.get("AmbientCapabilities").lower().split()
    if user in ("root", "0"):
        return user, not bounding or "cap_sys_ptrace" in bounding
    return user, "cap_sys_ptrace" in ambient


def check_setuid(checks: Checks, unit: Unit | None, has_cap: bool) -> None:
    """What happens to setuid and file-capability programs under the tracer: the kernel
    grants their privileges at exec only if the tracer has CAP_SYS_PTRACE."""
    if unit is None:
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = str(os.geteuid())
        who = f"vgpu-launch, run as {user} here,"
    else:
        user, has_cap = _unit_has_ptrace_cap(unit)
        who = f"vgpu-launch, run as {user} by unit {unit.name},"
    if has_cap:
        checks.add(
            OK,
            "ptrace: setuid programs",
            f"{who} has CAP_SYS_PTRACE: setuid and file-capability programs of the tree keep "
            "their privileges (and run without the preload: ld.so ignores LD_PRELOAD for them)",
        )
    else:
        checks.add(
            NOTE,
            "ptrace: setuid programs",
            f"{who} lacks CAP_SYS_PTRACE"
            + (
                " (root has it, unless a bounding set drops it)"
                if user not in ("root", "0")
                else ""
            )
            + ": setuid and file-capability programs of the tree (sudo, ping, ...) run without "
            "their privileges, as the kernel grants none at exec under a tracer without it",
            "run vgpu-launch as root if the service needs such programs to work",
        )


def _ptrace_diagnosis(
    facts: dict[str, Any], yama: str | None, seccomp: str, tracer: str, has_cap: bool
) -> tuple[str, str]:
    child_tracer = facts.get("child_tracer")
    if child_tracer:
        name = procfs.comm(child_tracer)
        return (
            f"the child was already traced by pid {child_tracer} ({name})"
            f"{traced_by_hint(child_tracer)}: this process runs under a tracer that follows "
            "forks",
            f"run vgpu-launch outside {name} (strace -f, gdb with follow-fork)",
        )
    if tracer != "0":
        name = procfs.comm(tracer)
        return (
            f"this process is traced by pid {tracer} ({name})",
            f"run vgpu-launch outside {name}",
        )
    if yama == "3":
        return ("kernel.yama.ptrace_scope = 3 disables ptrace", "reboot without that setting")
    if yama == "2" and not has_cap:
        return (
            "kernel.yama.ptrace_scope = 2 and no CAP_SYS_PTRACE",
            "give vgpu-launch CAP_SYS_PTRACE or set kernel.yama.ptrace_scope=1",
        )
    if seccomp == "2":
        return (
            "a seccomp filter on this process refuses ptrace (Seccomp: 2)",
            "allow ptrace in the seccomp profile (containers: a profile that allows "
            "ptrace, or --cap-add SYS_PTRACE on old docker versions)",
        )
    return (
        f"the kernel refused ({facts.get('errno', '?')}); an LSM (AppArmor, SELinux) may "
        "forbid ptrace here",
        "check the LSM's log (dmesg, audit.log) for a ptrace denial",
    )
