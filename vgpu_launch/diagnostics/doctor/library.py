"""Each preload library: an ELF shared object for this machine, for which word sizes,
who may change it, whether the service user can read it, and whether a program really loads it."""

from __future__ import annotations

import contextlib
import grp
import os
import platform
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ... import arch, elf, procfs, security
from ...config import Config
from ...errors import ConfigError
from ...trace import preload
from .. import libcheck, verify
from ..systemd import Unit
from .programs import Program
from .result import FAIL, NOTE, OK, WARN, Checks

_LOAD_TIMEOUT = 10.0


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
    return f"{security.user_name(st.st_uid)}:{security.group_name(st.st_gid)}"


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
    # every directory from / down (search permission), then the file (read permission)
    steps = [(d, 1, "searched") for d in reversed(_chain(real)[1:])] + [(real, 4, "read")]
    for p, want, verb in steps:
        try:
            st = os.stat(p)
        except OSError as exc:
            return f"{p}: {exc.strerror}"
        if not _may(st, user, want):
            return (
                f"{p} (mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st)}) cannot be "
                f"{verb} by {user.name}"
            )
    return None


def _loader32() -> str | None:
    abi = arch.native_abi(4)
    return abi.loader if abi and os.path.exists(abi.loader) else None


def check_library(
    checks: Checks,
    lib: str,
    source: str,
    user: ServiceUser,
    cfg: Config,
    programs: Sequence[Program] = (),
) -> None:
    """``programs``: those found to run under vgpu-launch (programs.check_programs)."""
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
        checks.add(
            FAIL,
            what,
            why,
            f"{fix} (--preload, VGPU_LAUNCH_PRELOAD or preload in the configuration file)",
        )
        return
    sizes = " and ".join(f"{w * 8}-bit" for w in sorted(result.files, reverse=True))
    files = ", ".join(f"{w * 8}-bit: {f}" for w, f in sorted(result.files.items(), reverse=True))
    checks.add(
        OK,
        what,
        f"ELF shared object for {platform.machine()}, covers {sizes} programs"
        + (f" ({files})" if preload.has_tokens(lib) else ""),
    )
    for word, why in result.unusable.items():
        if "no " in why and "dynamic loader" in why:
            checks.add(OK, f"{what}: {word * 8}-bit", f"{why}, so no {word * 8}-bit programs")
        else:
            hint = (
                f"install a {word * 8}-bit build at {verify.expand(lib, word) or lib}"
                if preload.has_tokens(lib)
                else f"use a path with $LIB (e.g. /opt/shim/$LIB/{os.path.basename(lib)}) and "
                f"install a {word * 8}-bit build there, if {word * 8}-bit programs need it"
            )
            if not why.startswith("/"):
                why = f"{lib} {why}"
            # Most hosts run only 64-bit programs: a missing 32-bit build matters only where a
            # program of that size was found.
            users = [p for p in programs if p.word == word and not p.static]
            if users:
                checks.add(
                    WARN,
                    f"{what}: {word * 8}-bit",
                    f"{word * 8}-bit programs will run without it: {why}; "
                    f"found {word * 8}-bit: {', '.join(p.describe() for p in users)}",
                    hint,
                )
            else:
                checks.add(
                    NOTE,
                    f"{what}: {word * 8}-bit",
                    f"{word * 8}-bit programs would run without it: {why}; no {word * 8}-bit "
                    "program was found (the unit's ExecStart, --check PROGRAM)",
                    hint,
                )

    trusted = {0, user.uid} if user.known else {0}
    problems: list[str] = []
    outside = False  # a path of a user outside this user namespace: chown cannot help there
    for file in dict.fromkeys(result.files.values()):
        try:
            found = security.find_problem(file, trusted)
        except OSError:
            continue
        if found is not None:
            problems.append(found.describe())
            outside = outside or found.outside
    if problems:
        accepted = cfg.allow_insecure
        checks.add(
            WARN if accepted else FAIL,
            f"{what}: permissions",
            "; ".join(dict.fromkeys(problems)) + ": whoever can change it runs code in "
            f"every process of the service (as {user.name})"
            + (
                f"; accepted with allow_insecure (from {cfg.sources.get('allow_insecure')})"
                if accepted
                else "; vgpu-launch refuses it"
            ),
            "make it not writable by others where it comes from (chmod go-w PATH on the "
            "host, or in the image): nobody in this user namespace can change it"
            if outside
            else f"make it and every directory above it owned by root (or {user.name}) and "
            "not writable by others (chown root: PATH; chmod go-w PATH)",
        )
    else:
        names = "root" if user.uid in (0, -1) else f"root and {user.name}"
        checks.add(
            OK, f"{what}: permissions", f"only {names} can change it or a directory above it"
        )

    if not user.known:
        checks.add(
            WARN,
            f"{what}: readable",
            f"cannot tell for user {user.name} (unknown here, or DynamicUser=)",
            "make the file and its directories world-readable",
        )
    else:
        for file in dict.fromkeys(result.files.values()):
            blocked = unreadable_by(file, user)
            if blocked:
                checks.add(
                    FAIL,
                    f"{what}: readable by {user.name}",
                    blocked,
                    f"chmod a+r the file and a+x its directories (or give {user.name} access)",
                )
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


def check_loads_64(checks: Checks, lib: str, file: str, user: ServiceUser, cfg: Config) -> None:
    what = f"library {lib}: loads (64-bit)"
    cat = shutil.which("cat", path="/usr/bin:/bin")
    if cat is None:
        checks.add(WARN, what, "no /bin/cat to start with it preloaded", "")
        return
    try:
        proc = subprocess.run(
            [cat, "/proc/self/maps"],
            env=_child_env(lib, cfg),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_LOAD_TIMEOUT,
            preexec_fn=_as_user(user),
            check=False,
        )
    except subprocess.TimeoutExpired:
        checks.add(
            FAIL,
            what,
            f"{cat} with it preloaded did not finish within "
            f"{_LOAD_TIMEOUT:.0f} s: its constructor hangs",
            "fix the library",
        )
        return
    except OSError as exc:
        checks.add(WARN, what, f"could not start {cat}: {exc.strerror}")
        return
    as_whom = f" as {user.name}" if _as_user(user) else ""
    if proc.returncode < 0:
        checks.add(
            FAIL,
            what,
            f"{cat} with it preloaded{as_whom} died of "
            f"{signal.Signals(-proc.returncode).name}: its constructor crashes",
            "fix the library (every program of the service would crash)",
        )
        return
    maps = procfs.parse_maps(proc.stdout)
    if verify.find_mapped(maps, file):
        extra = f" (exit status {proc.returncode})" if proc.returncode else ""
        checks.add(
            OK,
            what,
            f"{cat} started with it preloaded{as_whom}, {file} mapped, constructors ran{extra}",
        )
    else:
        why = _ld_errors(proc.stderr) or "not mapped, and ld.so said nothing"
        checks.add(
            FAIL,
            what,
            f"{cat} with it preloaded{as_whom}: {why}",
            "fix what ld.so reports (missing dependency, wrong architecture, permissions)",
        )


def _libc32() -> str | None:
    values = libcheck.token_values(4)
    if values is None:
        return None
    for path in (f"/{values[0]}/libc.so.6", f"/usr/{values[0]}/libc.so.6"):
        try:
            info = elf.elf_info(path)
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
        proc = subprocess.run(
            [loader, "--list", target],
            env={"LD_PRELOAD": lib, "PATH": "/bin"},
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_LOAD_TIMEOUT,
            preexec_fn=_as_user(user),
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        checks.add(WARN, what, f"could not run {loader}: {exc}")
        return
    real = os.path.realpath(file)
    listed = any(
        ln.strip().startswith((file + " ", real + " "))
        or f"=> {real} " in ln
        or f"=> {file} " in ln
        for ln in proc.stdout.splitlines()
    )
    if proc.returncode == 0 and listed and "cannot be preloaded" not in proc.stderr:
        checks.add(
            OK,
            what,
            f"the 32-bit loader {loader} maps it (constructors not run: no "
            "32-bit program is started)",
        )
    else:
        checks.add(
            FAIL,
            what,
            f"the 32-bit loader: {_ld_errors(proc.stderr) or proc.stdout}",
            "fix what ld.so reports (a missing 32-bit dependency?)",
        )
