"""``vgpu-launch doctor``: everything that would make vgpu-launch or the preload fail here.

Each check is one line, ``ok``/``warn``/``fail``, what, why and how to fix it. The exit status
is 0 only when nothing fails. The checks test what they can for real: ptrace by tracing a
child through an exec, each library by starting a program with it preloaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import json
import os
import platform
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, Any

from .. import procfs, security
from ..config import DEFAULT_CONFIG, KEYS, Config
from ..errors import ConfigError
from ..trace import preload
from ..trace import ptracelib as pt
from . import libcheck, verify
from .commands import Effective, Unit, UnitError, effective_config, launcher_argv, load_unit

OK, WARN, FAIL = "ok", "warn", "fail"
CAP_SYS_PTRACE = 19
WALL = 0x40000000
_LOAD_TIMEOUT = 10.0


@dataclass
class Check:
    status: str
    what: str
    why: str
    fix: str = ""


class Checks(list[Check]):
    def add(self, status: str, what: str, why: str, fix: str = "") -> Check:
        c = Check(status, what, why, fix)
        self.append(c)
        return c

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self)


# ---------------------------------------------------------------------------------------------
# ptrace


def _yama() -> str | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return f.read().strip()
    except OSError:
        return None


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


def _seize(pid: int, options: int) -> int:
    """PTRACE_SEIZE through libc, for a reliable errno (python-ptrace's C extension does not
    hand it over): 0 or the error number."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.ptrace
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    ctypes.set_errno(0)
    if fn(pt.PTRACE_SEIZE, pid, None, ctypes.c_void_p(options)) == -1:
        return ctypes.get_errno() or errno.EPERM
    return 0


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
        err = _seize(pid, pt.PTRACE_O_TRACEEXEC | pt.PTRACE_O_EXITKILL)
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
            from .. import arch

            arch.read_sp(pid)
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
            got, status = os.waitpid(pid, os.WNOHANG | WALL)
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
            got, status = os.waitpid(pid, os.WNOHANG | WALL)
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
        checks.add(OK, "ptrace: yama", f"kernel.yama.ptrace_scope = {yama}: a process may trace "
                   "its own children")
    elif yama == "2":
        checks.add(OK if has_cap else FAIL, "ptrace: yama",
                   "kernel.yama.ptrace_scope = 2: only processes with CAP_SYS_PTRACE may trace"
                   + ("" if has_cap else ", and this one lacks it"),
                   "" if has_cap else "run vgpu-launch with CAP_SYS_PTRACE (AmbientCapabilities="
                   "CAP_SYS_PTRACE in the unit), or set kernel.yama.ptrace_scope=1")
    else:
        checks.add(FAIL, "ptrace: yama", f"kernel.yama.ptrace_scope = {yama}: ptrace is disabled "
                   "until reboot", "boot without that setting (sysctl kernel.yama.ptrace_scope "
                   "cannot be lowered from 3)")

    if seccomp == "2":
        checks.add(OK if worked else FAIL, "ptrace: seccomp",
                   "a seccomp filter is active on this process"
                   + (" and lets ptrace through" if worked else " and refuses ptrace"),
                   "" if worked else "allow ptrace in the filter (a container runtime's profile: "
                   "docker --security-opt seccomp=... or a profile that allows ptrace)")
    else:
        checks.add(OK, "ptrace: seccomp", f"no seccomp filter on this process (Seccomp: "
                   f"{seccomp})")

    if tracer != "0":
        from ..trace.release import traced_by_hint

        name = procfs.comm(tracer)
        checks.add(FAIL if not worked else WARN, "ptrace: tracer",
                   f"this process is traced by pid {tracer} ({name}){traced_by_hint(tracer)}"
                   + (": a tracer that follows forks takes every child first" if not worked
                      else ""),
                   f"run vgpu-launch outside {name} (or trace vgpu-launch without following its "
                   "children)")
    else:
        checks.add(OK, "ptrace: tracer", "this process is not traced (TracerPid 0)")

    checks.add(OK, "ptrace: capabilities",
               ("CAP_SYS_PTRACE present" if has_cap else "CAP_SYS_PTRACE absent")
               + ": not needed to trace one's own children; needed only with "
               "kernel.yama.ptrace_scope = 2, or to reach children that switch to another user")


def _ptrace_diagnosis(facts: dict[str, Any], yama: str | None, seccomp: str, tracer: str,
                      has_cap: bool) -> tuple[str, str]:
    child_tracer = facts.get("child_tracer")
    if child_tracer:
        from ..trace.release import traced_by_hint

        name = procfs.comm(child_tracer)
        return (f"the child was already traced by pid {child_tracer} ({name})"
                f"{traced_by_hint(child_tracer)}: this process runs under a tracer that "
                "follows forks",
                f"run vgpu-launch outside {name} (strace -f, gdb with follow-fork)")
    if tracer != "0":
        name = procfs.comm(tracer)
        return (f"this process is traced by pid {tracer} ({name})",
                f"run vgpu-launch outside {name}")
    if yama == "3":
        return ("kernel.yama.ptrace_scope = 3 disables ptrace", "reboot without that setting")
    if yama == "2" and not has_cap:
        return ("kernel.yama.ptrace_scope = 2 and no CAP_SYS_PTRACE",
                "give vgpu-launch CAP_SYS_PTRACE or set kernel.yama.ptrace_scope=1")
    if seccomp == "2":
        return ("a seccomp filter on this process refuses ptrace (Seccomp: 2)",
                "allow ptrace in the seccomp profile (containers: a profile that allows "
                "ptrace, or --cap-add SYS_PTRACE on old docker versions)")
    return (f"the kernel refused ({facts.get('errno', '?')}); an LSM (AppArmor, SELinux) may "
            "forbid ptrace here", "check the LSM's log (dmesg, audit.log) for a ptrace denial")


# ---------------------------------------------------------------------------------------------
# configuration


def check_config(checks: Checks, eff: Effective, preload_given: bool) -> Config | None:
    if eff.config is None:
        checks.add(FAIL, "config", eff.error or "cannot be read",
                   "correct it (vgpu-launch --help lists the variables and keys)")
        return None
    cfg = eff.config
    if cfg.config_file:
        checks.add(OK, "config: file", f"{cfg.config_file} read")
    else:
        checks.add(OK, "config: file", f"none ({DEFAULT_CONFIG} does not exist): command line "
                   "and environment only")
    for key in KEYS:
        if key in cfg.sources:
            value = getattr(cfg, key)
            checks.add(OK, f"config: {key}", f"{_show(value)} (from {cfg.sources[key]})")
    defaults = [k for k in KEYS if k not in cfg.sources]
    if defaults:
        checks.add(OK, "config: defaults", ", ".join(defaults))
    if not cfg.preload:
        checks.add(FAIL, "config: preload", "no preload library configured",
                   f"give --preload PATH, set VGPU_LAUNCH_PRELOAD, or preload = [...] in "
                   f"{DEFAULT_CONFIG}")
    return cfg


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ":".join(value) if value else "(empty)"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "(empty)"
    return str(value)


# ---------------------------------------------------------------------------------------------
# preload libraries


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gids: frozenset[int]
    known: bool = True


def service_user(unit: Unit | None) -> ServiceUser:
    if unit is None:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return ServiceUser(name, uid, frozenset([os.getegid(), *os.getgroups()]))
    user = unit.get("User") or "root"
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        return ServiceUser(user, -1, frozenset(), known=False)
    gids = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    for g in [unit.get("Group"), *unit.get("SupplementaryGroups").split()]:
        if not g:
            continue
        with contextlib.suppress(KeyError):
            gids.add(grp.getgrnam(g).gr_gid if not g.isdigit() else int(g))
    return ServiceUser(pw.pw_name, pw.pw_uid, frozenset(gids))


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def _chain(path: str) -> list[str]:
    """``path`` and each directory above it, up to /."""
    out = [path]
    while path not in ("/", ""):
        path = os.path.dirname(path)
        out.append(path or "/")
    return out


def _may(st: os.stat_result, user: ServiceUser, want: int) -> bool:
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        bits = st.st_mode >> 6
    elif st.st_gid in user.gids:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def unreadable_by(path: str, user: ServiceUser) -> str | None:
    """The first component that keeps ``user`` from reading ``path`` (mode bits; ACLs are not
    looked at), or None."""
    real = os.path.realpath(path)
    chain = _chain(real)
    for p in reversed(chain[1:]):
        try:
            st = os.stat(p)
        except OSError as exc:
            return f"{p}: {exc.strerror}"
        if not _may(st, user, 1):
            return (f"{p} (mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st)}) cannot be "
                    f"searched by {user.name}")
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"{real}: {exc.strerror}"
    if not _may(st, user, 4):
        return (f"{real} (mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st)}) cannot be "
                f"read by {user.name}")
    return None


def _expansions(lib: str) -> dict[int, str | None]:
    """word size -> the file ld.so loads on this host (None: no loader of that size)."""
    out: dict[int, str | None] = {}
    for word in (8, 4):
        if preload.has_tokens(lib) and libcheck.token_values(word) is None:
            out[word] = None
            continue
        out[word] = verify.expand(lib, word)
    return out


def _loader32() -> str | None:
    machine = platform.machine()
    entry = libcheck._LOADERS.get((machine, 4))
    return entry[0] if entry and os.path.exists(entry[0]) else None


def check_library(checks: Checks, lib: str, source: str, user: ServiceUser,
                  cfg: Config) -> None:
    what = f"library {lib}"
    try:
        # who may change the file is its own check below
        result = libcheck.check(lib, source, allow_insecure=True)
    except ConfigError as exc:
        why = str(exc).removeprefix(f"preload library {lib}: ")
        if "not found" in why:
            fix = "install the library there, or correct the path"
        elif "-bit" in why:
            fix = "install a 64-bit build of the library there (with $LIB in the path, both)"
        else:
            fix = "point the preload at the shared library file itself"
        checks.add(FAIL, what, why, f"{fix} (--preload, VGPU_LAUNCH_PRELOAD or preload in "
                   "the configuration file)")
        return
    sizes = " and ".join(f"{w * 8}-bit" for w in sorted(result.files, reverse=True))
    files = ", ".join(f"{w * 8}-bit: {f}" for w, f in sorted(result.files.items(), reverse=True))
    checks.add(OK, what, f"ELF shared object for {platform.machine()}, covers {sizes} programs"
               + (f" ({files})" if preload.has_tokens(lib) else ""))
    for word, why in result.unusable.items():
        if "no " in why and "dynamic loader" in why:
            checks.add(OK, f"{what}: {word * 8}-bit", f"{why}, so no {word * 8}-bit programs")
        else:
            hint = (f"install a {word * 8}-bit build at {verify.expand(lib, word) or lib}"
                    if preload.has_tokens(lib) else
                    f"use a path with $LIB (e.g. /opt/shim/$LIB/{os.path.basename(lib)}) and "
                    f"install a {word * 8}-bit build there, if {word * 8}-bit programs need it")
            if not why.startswith("/"):
                why = f"{lib} {why}"
            checks.add(WARN, f"{what}: {word * 8}-bit",
                       f"{word * 8}-bit programs will run without it: {why}", hint)

    trusted = {0, user.uid} if user.known else {0}
    problems: list[str] = []
    for file in dict.fromkeys(result.files.values()):
        try:
            found = security.find_problem(file, trusted)
        except OSError:
            continue
        if found is not None:
            problems.append(found.describe())
    if problems:
        accepted = cfg.allow_insecure
        checks.add(WARN if accepted else FAIL, f"{what}: permissions",
                   "; ".join(dict.fromkeys(problems)) + ": whoever can change it runs code in "
                   f"every process of the service (as {user.name})"
                   + (f"; accepted with allow_insecure (from {cfg.sources.get('allow_insecure')})"
                      if accepted else "; vgpu-launch refuses it"),
                   f"make it and every directory above it owned by root (or {user.name}) and "
                   "not writable by others (chown root: PATH; chmod go-w PATH)")
    else:
        names = "root" if user.uid in (0, -1) else f"root and {user.name}"
        checks.add(OK, f"{what}: permissions", f"only {names} can change it or a directory "
                   "above it")

    if not user.known:
        checks.add(WARN, f"{what}: readable", f"cannot tell for user {user.name} (unknown here, "
                   "or DynamicUser=)", "make the file and its directories world-readable")
    else:
        for file in dict.fromkeys(result.files.values()):
            blocked = unreadable_by(file, user)
            if blocked:
                checks.add(FAIL, f"{what}: readable by {user.name}", blocked,
                           f"chmod a+r the file and a+x its directories (or give {user.name} "
                           "access)")
                break
        else:
            checks.add(OK, f"{what}: readable by {user.name}", "file and directories allow it")

    if 8 in result.files:
        check_loads_64(checks, lib, result.files[8], user, cfg)
    if 4 in result.files:
        check_loads_32(checks, lib, result.files[4], user)


def _child_env(lib: str, cfg: Config) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LD_PRELOAD": lib}
    env.update(cfg.env)
    env.update(cfg.force_env)
    return env


def _as_user(user: ServiceUser) -> Callable[[], None] | None:
    if os.geteuid() != 0 or not user.known or user.uid == 0:
        return None
    pw = pwd.getpwuid(user.uid)

    def drop() -> None:  # pragma: no cover - runs in the child
        os.setgroups(sorted(user.gids))
        os.setgid(pw.pw_gid)
        os.setuid(user.uid)

    return drop


def _ld_errors(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if "ld.so" in ln or "preload" in ln]
    return " | ".join(lines or [ln.strip() for ln in stderr.splitlines()[-3:]])


def check_loads_64(checks: Checks, lib: str, file: str, user: ServiceUser,
                   cfg: Config) -> None:
    what = f"library {lib}: loads (64-bit)"
    cat = shutil.which("cat", path="/usr/bin:/bin")
    if cat is None:
        checks.add(WARN, what, "no /bin/cat to start with it preloaded", "")
        return
    try:
        proc = subprocess.run([cat, "/proc/self/maps"], env=_child_env(lib, cfg),
                              capture_output=True, text=True, errors="replace",
                              timeout=_LOAD_TIMEOUT, preexec_fn=_as_user(user), check=False)
    except subprocess.TimeoutExpired:
        checks.add(FAIL, what, f"{cat} with it preloaded did not finish within "
                   f"{_LOAD_TIMEOUT:.0f} s: its constructor hangs", "fix the library")
        return
    except OSError as exc:
        checks.add(WARN, what, f"could not start {cat}: {exc.strerror}")
        return
    as_whom = f" as {user.name}" if _as_user(user) else ""
    if proc.returncode < 0:
        checks.add(FAIL, what, f"{cat} with it preloaded{as_whom} died of "
                   f"{signal.Signals(-proc.returncode).name}: its constructor crashes",
                   "fix the library (every program of the service would crash)")
        return
    maps = verify.parse_maps(proc.stdout)
    if verify.find_mapped(maps, file):
        extra = f" (exit status {proc.returncode})" if proc.returncode else ""
        checks.add(OK, what, f"{cat} started with it preloaded{as_whom}, {file} mapped, "
                   f"constructors ran{extra}")
    else:
        why = _ld_errors(proc.stderr) or "not mapped, and ld.so said nothing"
        checks.add(FAIL, what, f"{cat} with it preloaded{as_whom}: {why}",
                   "fix what ld.so reports (missing dependency, wrong architecture, permissions)")


def _libc32() -> str | None:
    values = libcheck.token_values(4)
    if values is None:
        return None
    for path in (f"/{values[0]}/libc.so.6", f"/usr/{values[0]}/libc.so.6"):
        try:
            info = libcheck.elf_info(path)
        except OSError:
            continue
        if info is not None and info.word == 4:
            return path
    return None


def check_loads_32(checks: Checks, lib: str, file: str, user: ServiceUser) -> None:
    what = f"library {lib}: loads (32-bit)"
    loader = _loader32()
    if loader is None:
        return
    # ld.so --list handles LD_PRELOAD only for an object with dependencies: the 32-bit libc
    target = _libc32() or file
    try:
        proc = subprocess.run([loader, "--list", target], env={"LD_PRELOAD": lib, "PATH": "/bin"},
                              capture_output=True, text=True, errors="replace",
                              timeout=_LOAD_TIMEOUT, preexec_fn=_as_user(user), check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        checks.add(WARN, what, f"could not run {loader}: {exc}")
        return
    real = os.path.realpath(file)
    listed = any(ln.strip().startswith((file + " ", real + " ")) or f"=> {real} " in ln
                 or f"=> {file} " in ln for ln in proc.stdout.splitlines())
    if proc.returncode == 0 and listed and "cannot be preloaded" not in proc.stderr:
        checks.add(OK, what, f"the 32-bit loader {loader} maps it (constructors not run: no "
                   "32-bit program is started)")
    else:
        checks.add(FAIL, what, f"the 32-bit loader: {_ld_errors(proc.stderr) or proc.stdout}",
                   "fix what ld.so reports (a missing 32-bit dependency?)")


# ---------------------------------------------------------------------------------------------
# a systemd unit


def check_unit(checks: Checks, unit: Unit, libs: dict[str, str] | None = None) -> None:
    """``libs``: preload library -> a file it expands to, for the sandbox settings."""
    u = f"unit {unit.name}"
    frag = unit.get("FragmentPath") or "(no unit file)"
    checks.add(OK, u, f"{unit.get('LoadState', '?')}, {unit.get('ActiveState', '?')}, "
               f"from {frag}")
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
            checks.add(OK, f"{u}: ExecStart", " ".join(argv))
        else:
            checks.add(FAIL, f"{u}: ExecStart", f"{exe} is not executable here",
                       "install vgpu-launch or correct the path in ExecStart")
        shell = os.path.basename(exe) in ("sh", "bash", "dash")
        if shell:
            checks.add(WARN, f"{u}: ExecStart", "vgpu-launch is started through a shell: it must "
                       "be exec'd (exec vgpu-launch ...) to be the main process",
                       "put vgpu-launch first in ExecStart")
    else:
        checks.add(FAIL, f"{u}: ExecStart", f"runs {' '.join(cmds[0])}, not vgpu-launch",
                   f"add a drop-in (systemctl edit {unit.name}): [Service] ExecStart= and "
                   f"ExecStart=/usr/bin/vgpu-launch -- {' '.join(cmds[0])}")

    km = unit.get("KillMode", "control-group")
    if km == "mixed":
        checks.add(OK, f"{u}: KillMode", "mixed: SIGTERM to vgpu-launch only (it forwards it "
                   "once), SIGKILL to the whole cgroup at the end")
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
            checks.add(OK, f"{u}: NotifyAccess", f"all (Type={typ}): CMD's sd_notify reaches "
                       "systemd")
        else:
            checks.add(FAIL, f"{u}: NotifyAccess", f"{na} with Type={typ}: systemd drops CMD's "
                       "READY=1 (CMD is not the main process) and the start times out",
                       "set NotifyAccess=all in a drop-in")
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
            checks.add(FAIL, f"{u}: SystemCallFilter",
                       f"ptrace is {'denied' if deny else 'not in the allow-list'} (fails with "
                       f"{err}): vgpu-launch exits 125 'cannot trace'",
                       "add SystemCallFilter=ptrace in a drop-in (after the other "
                       "SystemCallFilter= lines; @system-service does not include it)")
        else:
            checks.add(OK, f"{u}: SystemCallFilter", "allows ptrace")
    else:
        checks.add(OK, f"{u}: SystemCallFilter", "none")

    checks.add(OK, f"{u}: NoNewPrivileges",
               f"{unit.get('NoNewPrivileges', 'no')}: does not affect ptrace of one's own children"
               + (" (and setuid programs then run unprivileged, so they do get the preload)"
                  if unit.flag("NoNewPrivileges") else ""))

    cbs = unit.get("CapabilityBoundingSet")
    if cbs and root_unit and "cap_sys_ptrace" not in cbs.lower().split():
        checks.add(WARN, f"{u}: CapabilityBoundingSet",
                   "lacks CAP_SYS_PTRACE in a unit running as root: tracing the tree works, but "
                   "processes that switch to another user (setuid(), setpriv) cannot be "
                   "rewritten and run without the preload",
                   "add CAP_SYS_PTRACE to CapabilityBoundingSet= if the service drops privileges "
                   "in child processes")
    else:
        checks.add(OK, f"{u}: CapabilityBoundingSet",
                   "does not matter for tracing the unit's own processes"
                   + ("" if root_unit else " (a non-root unit has no capabilities anyway)"))

    checks.add(OK, f"{u}: ProtectKernelTunables",
               f"{unit.get('ProtectKernelTunables', 'no')}: does not matter (it makes /proc/sys "
               "read-only; vgpu-launch only reads it)")

    if unit.flag("PrivateDevices"):
        checks.add(WARN, f"{u}: PrivateDevices",
                   "yes: /dev/nvidia* are hidden from the service, CUDA will find no GPU",
                   "set PrivateDevices=no (or DeviceAllow= the GPU devices)")
    if unit.get("ProtectProc") == "invisible" and root_unit:
        checks.add(WARN, f"{u}: ProtectProc",
                   "invisible: processes that switch to another user vanish from vgpu-launch's "
                   "/proc and cannot be rewritten", "set ProtectProc=default")
    if unit.get("SystemCallArchitectures") == "native":
        checks.add(OK, f"{u}: SystemCallArchitectures",
                   "native: 32-bit programs cannot run in this unit at all")
    if unit.get("AppArmorProfile"):
        checks.add(WARN, f"{u}: AppArmorProfile",
                   f"{unit.get('AppArmorProfile')}: the profile must allow ptrace (trace) of the "
                   "unit's own processes", "check the profile for a ptrace rule")
    for lib, file in libs.items():
        hidden = _hidden_by_sandbox(unit, file)
        if hidden:
            shown = file if file == lib else f"{file} ({lib})"
            checks.add(FAIL, f"{u}: {hidden[0]}", f"{hidden[1]}: the service cannot see {shown}, "
                       "so no process of it loads the preload",
                       "install the library under /usr or /opt (or relax the setting)")
    if unit.flag("DynamicUser"):
        checks.add(WARN, f"{u}: DynamicUser",
                   "yes: the service user exists only while it runs; library permissions cannot "
                   "be checked for it here", "make the library world-readable")


# ---------------------------------------------------------------------------------------------
# the command


def collect(preload_given: list[str] | None, unit_name: str | None,
            config_path: str | None) -> Checks:
    checks = Checks()
    unit: Unit | None = None
    if unit_name:
        try:
            unit = load_unit(unit_name)
        except UnitError as exc:
            checks.add(FAIL, f"unit {unit_name}", str(exc),
                       "run doctor where systemd runs the unit (as root, or with "
                       "permission to query it)")
    check_ptrace(checks, unit)
    eff = effective_config(preload_given, config_path, unit)
    cfg = check_config(checks, eff, bool(preload_given))
    if cfg is not None:
        user = service_user(unit)
        for lib in cfg.preload:
            try:
                check_library(checks, lib, cfg.sources.get("preload", ""), user, cfg)
            except Exception as exc:  # one broken check must not hide the others
                checks.add(FAIL, f"library {lib}", f"the check itself failed: {exc}")
    if unit is not None:
        libs: dict[str, str] = {}
        for lib in cfg.preload if cfg is not None else []:
            file = verify.expand(lib, 8)
            if file:
                libs[lib] = file
        check_unit(checks, unit, libs)
    return checks


def render_text(checks: Checks, out: IO[str]) -> None:
    width = min(44, max(len(c.what) for c in checks)) if checks else 0
    for c in checks:
        line = f"{c.status:<4}  {c.what:<{width}}  {c.why}"
        if c.fix:
            line += f"  -> fix: {c.fix}"
        out.write(line + "\n")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    out.write(f"{fails} failed, {warns} warnings, {len(checks) - fails - warns} ok\n")


def run(preload_given: list[str] | None, unit_name: str | None, config_path: str | None,
        fmt: str, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    checks = collect(preload_given, unit_name, config_path)
    if fmt == "json":
        json.dump({"checks": [asdict(c) for c in checks], "ok": not checks.failed}, out, indent=2)
        out.write("\n")
    else:
        render_text(checks, out)
    return 1 if checks.failed else 0
