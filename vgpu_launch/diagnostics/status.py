"""``vgpu-launch status``: which processes of a tree really have the preload mapped.

One line per process: its pid, whether each preload library is mapped (``/proc/PID/maps``, the
truth), the ``LD_PRELOAD`` its ``/proc/PID/environ`` shows, and a note where the two disagree.
``/proc/PID/environ`` shows the environment a program was *started* with: a variable that
vgpu-launch put in at exec time is never there, although the program's own ``getenv`` sees it.

Which processes: the tree under PID; or every process of a systemd unit's cgroup (``--unit``);
or, by default, the trees of every vgpu-launch process found in /proc. Works for processes
that vgpu-launch did not start, to find the ones that escaped.

Static binaries and setuid programs cannot load a preload at all (no dynamic loader; ld.so
ignores LD_PRELOAD under AT_SECURE): they are listed with a note and do not count against the
exit status. vgpu-launch processes themselves are listed and not checked.

Exit status: 0 every counted process has every library; 1 one does not, or could not be read;
2 nothing to look at (bad usage, no such process, no library to look for).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .. import procfs
from ..errors import EXIT_PROBLEM_FOUND, EXIT_USAGE, LaunchError
from ..launchers import launcher_args, untraced_note
from ..options import parse_launcher_known, split_command
from ..trace import preload
from . import verify

_COMMAND_WIDTH = 72
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


# ---------------------------------------------------------------------------------------------
# /proc


@dataclass
class Proc:
    pid: int
    ppid: int
    comm: str
    state: str
    argv: list[str]
    children: list[int] = field(default_factory=list)

    @property
    def command(self) -> str:
        if not self.argv:
            return f"[{self.comm}]"
        args = launcher_args(self.argv)
        argv = self.argv if args is None else ["vgpu-launch", *args]
        return _CONTROL.sub(" ", " ".join(argv))


def _read_proc(pid: int) -> Proc | None:
    stat = procfs.stat(pid)
    argv = procfs.cmdline(pid)
    if stat is None or argv is None:
        return None
    return Proc(pid, stat.ppid, stat.comm, stat.state, argv)


def scan() -> dict[int, Proc]:
    procs: dict[int, Proc] = {}
    for pid in procfs.pids():
        p = _read_proc(pid)
        if p is not None:
            procs[p.pid] = p
    for p in procs.values():
        parent = procs.get(p.ppid)
        if parent is not None and p.pid != p.ppid:
            parent.children.append(p.pid)
    for p in procs.values():
        p.children.sort()
    return procs


# ---------------------------------------------------------------------------------------------
# which libraries


def preload_of_launcher(pid: int, args: Sequence[str]) -> tuple[list[str], str] | None:
    """What a vgpu-launch process guarantees: its --preload options, else VGPU_LAUNCH_PRELOAD
    or LD_PRELOAD from its environment."""
    try:
        values, _config = parse_launcher_known(split_command(list(args))[0])
    except (LaunchError, SystemExit):
        values = {}
    libs = list(values.get("preload") or [])
    if libs:
        return libs, f"--preload of vgpu-launch pid {pid}"
    env = procfs.environ(pid) or {}
    for var in ("VGPU_LAUNCH_PRELOAD", "LD_PRELOAD"):
        value = env.get(var)
        if value:
            return ([p for p in re.split(r"[:\s]+", value) if p], f"{var} of vgpu-launch pid {pid}")
    return None


# ---------------------------------------------------------------------------------------------
# one process


@dataclass
class Row:
    pid: int
    ppid: int
    depth: int
    command: str
    argv: list[str]
    role: str  # "process" | "launcher"
    libraries: list[str]
    mapped: dict[str, str | None] = field(default_factory=dict)
    environ_preload: str | None = None
    environ_readable: bool = True
    bits: int | None = None
    static: bool | None = None
    secure: bool | None = None
    state: str = "running"  # running | zombie | unreadable | gone
    counted: bool = True
    ok: bool = True
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "ppid": self.ppid,
            "depth": self.depth,
            "command": self.command,
            "argv": self.argv,
            "role": self.role,
            "bits": self.bits,
            "static": self.static,
            "setuid": self.secure,
            "state": self.state,
            "libraries": self.libraries,
            "mapped": self.mapped,
            "has_all": bool(self.mapped) and all(self.mapped.values()),
            "environ_ld_preload": self.environ_preload if self.environ_readable else None,
            "environ_readable": self.environ_readable,
            "counted": self.counted,
            "ok": self.ok,
            "note": self.note,
        }


def inspect(proc: Proc, depth: int, libs: list[str], *, launcher: bool) -> Row:
    row = Row(
        proc.pid,
        proc.ppid,
        depth,
        proc.command,
        proc.argv,
        "launcher" if launcher else "process",
        list(libs),
    )
    env = procfs.environ(proc.pid)
    if env is None:
        row.environ_readable = False
    else:
        row.environ_preload = env.get("LD_PRELOAD")
    if launcher:
        row.counted = False
        row.note = "vgpu-launch (not checked)"
        return row
    if proc.state == "Z":
        row.state, row.counted, row.note = "zombie", False, "exited (zombie, not yet reaped)"
        return row
    try:
        maps = procfs.read_maps(proc.pid)
    except OSError as exc:
        row.state, row.ok = "unreadable", False
        row.note = f"cannot read /proc/{proc.pid}/maps ({exc.strerror}): run as root"
        return row
    if maps is None:
        row.state, row.counted, row.note = "gone", False, "exited while being looked at"
        return row
    word, static = procfs.exe_word(proc.pid, maps)
    row.bits = word * 8 if word else None
    row.static = static
    row.secure = procfs.secure(proc.pid, word or 8)
    if row.secure is None:  # auxv unreadable: compare the real and effective ids
        row.secure = _ids_differ(proc.pid)
    exe = procfs.exe_or_empty(proc.pid)
    root = f"/proc/{proc.pid}/root"
    for lib in libs:
        file = verify.expand(lib, word or 8, exe)
        row.mapped[lib] = verify.find_mapped(maps, file, root)
    missing = [lib for lib, where in row.mapped.items() if where is None]
    listed = set(preload.split(os.fsencode(row.environ_preload or "")))
    in_env = [lib for lib in libs if os.fsencode(lib) in listed]
    if not missing:
        if env is not None and len(in_env) < len(libs):
            row.note = (
                f"injected at exec: not visible in /proc/{proc.pid}/environ, which "
                "shows the environment the program was started with"
            )
        return row
    if static or row.secure:
        row.counted = False
        row.note = verify.reason_missing(
            missing[0], word or 8, exe, static=bool(static), secure=bool(row.secure), maps=maps
        )
        row.note += " (not counted)"
        return row
    row.ok = False
    reasons = [verify.reason_missing(lib, word or 8, exe, maps=maps) for lib in missing]
    reason = "; ".join(dict.fromkeys(reasons))
    missing_in_env = [lib for lib in missing if lib in in_env]
    if missing_in_env:
        row.note = f"LD_PRELOAD lists it but it is not mapped: {reason}"
    elif env is None:
        row.note = f"not mapped: {reason}"
    else:
        row.note = "escaped: started without the preload (not under vgpu-launch, excluded, or "
        row.note += "its injection failed: see its exec event)"
        if not reason.startswith("ld.so refused"):
            row.note += f"; {reason}"
    if len(libs) > 1:
        row.note = f"missing {', '.join(missing)}: {row.note}"
    return row


def _ids_differ(pid: int) -> bool | None:
    uid = procfs.status_field(pid, "Uid")
    gid = procfs.status_field(pid, "Gid")
    if uid is None or gid is None:
        return None
    u, g = uid.split(), gid.split()
    return len(set(u[:2])) > 1 or len(set(g[:2])) > 1


# ---------------------------------------------------------------------------------------------
# the command


@dataclass
class Report:
    rows: list[Row]
    libraries: list[str]
    source: str
    scope: str
    problems: list[str] = field(default_factory=list)

    @property
    def counted(self) -> list[Row]:
        return [r for r in self.rows if r.counted]

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.rows)

    def summary(self) -> dict[str, Any]:
        counted = self.counted
        return {
            "processes": len(self.rows),
            "checked": len(counted),
            "with_all": sum(1 for r in counted if r.ok),
            "missing": [r.pid for r in self.rows if not r.ok],
            "not_counted": [r.pid for r in self.rows if not r.counted],
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "libraries": self.libraries,
            "libraries_from": self.source,
            "processes": [r.as_json() for r in self.rows],
            "summary": self.summary(),
            "problems": self.problems,
            "ok": self.ok,
        }


class StatusError(Exception):
    """Nothing to look at: exit 2 with this message."""


def _walk(
    procs: dict[int, Proc], root: int, members: set[int] | None, depth: int = 0
) -> Iterable[tuple[Proc, int]]:
    stack = [(root, depth)]
    seen: set[int] = set()
    while stack:
        pid, d = stack.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        yield procs[pid], d
        kids = [c for c in procs[pid].children if members is None or c in members]
        stack.extend((c, d + 1) for c in reversed(kids))


def collect(
    pid: int | None,
    unit_cgroup: str | None,
    libs: list[str] | None,
    libs_source: str,
    *,
    own_pid: int | None = None,
) -> Report:
    """Build the report. ``libs`` None: each tree is checked against the libraries of the
    vgpu-launch process at its top (or above it)."""
    own = os.getpid() if own_pid is None else own_pid
    procs = scan()
    members: set[int] | None = None
    launchers = {
        p.pid: a
        for p in procs.values()
        if p.pid != own and (a := launcher_args(p.argv)) is not None
    }
    if pid is not None:
        if pid not in procs:
            raise StatusError(f"no process {pid}")
        roots = [pid]
        scope = f"the tree under pid {pid}"
    elif unit_cgroup is not None:
        members = procfs.cgroup_members(unit_cgroup) - {own}
        if not members:
            raise StatusError(f"no process in cgroup {unit_cgroup} (is the unit running?)")
        roots = sorted(m for m in members if procs.get(m) and procs[m].ppid not in members)
        scope = f"cgroup {unit_cgroup}"
    else:
        roots = sorted(p for p in launchers if not _below_launcher(procs, p, launchers))
        if not roots:
            raise StatusError("no vgpu-launch process found: give a PID or --unit NAME")
        scope = "every vgpu-launch process"

    rows: list[Row] = []
    problems: list[str] = []
    all_libs: list[str] = list(libs or [])
    sources: list[str] = [libs_source] if libs else []
    for root in roots:
        tree_libs = libs
        if tree_libs is None:
            found = _libs_above(procs, root, launchers, members)
            if found is None:
                problems.append(
                    f"no library to look for in the tree of pid {root}: give --preload PATH"
                )
                tree_libs = []
            else:
                tree_libs, src = found
                sources.append(src)
                all_libs.extend(x for x in tree_libs if x not in all_libs)
        for proc, depth in _walk(procs, root, members):
            if proc.pid == own:
                continue
            rows.append(inspect(proc, depth, tree_libs, launcher=proc.pid in launchers))
    _mark_released(rows, procs, launchers)
    if not all_libs:
        raise StatusError("no library to look for: give --preload PATH (or configure preload)")
    return Report(rows, all_libs, "; ".join(dict.fromkeys(sources)), scope, problems)


def _mark_released(
    rows: list[Row], procs: dict[int, Proc], launchers: dict[int, list[str]]
) -> None:
    """Processes below a vgpu-launch that it no longer traces (`vgpu-launch release`)."""
    for row in rows:
        if (
            row.role == "process"
            and row.state == "running"
            and _below_launcher(procs, row.pid, launchers)
        ):
            note = untraced_note(row.pid, set(launchers))
            if note:
                row.note = f"{row.note}; {note}" if row.note else note


def _below_launcher(procs: dict[int, Proc], pid: int, launchers: dict[int, list[str]]) -> bool:
    seen = {pid}
    parent = procs[pid].ppid
    while parent in procs and parent not in seen:
        if parent in launchers:
            return True
        seen.add(parent)
        parent = procs[parent].ppid
    return False


def _libs_above(
    procs: dict[int, Proc], root: int, launchers: dict[int, list[str]], members: set[int] | None
) -> tuple[list[str], str] | None:
    pid: int | None = root
    seen: set[int] = set()
    while pid is not None and pid not in seen and pid in procs:
        seen.add(pid)
        if pid in launchers:
            return preload_of_launcher(pid, launchers[pid])
        pid = procs[pid].ppid or None
    # a unit: its vgpu-launch may sit anywhere in the cgroup
    for lp in sorted(launchers):
        if members is not None and lp in members:
            return preload_of_launcher(lp, launchers[lp])
    return None


# ---------------------------------------------------------------------------------------------
# output


def _mapped_cell(row: Row) -> str:
    if row.role == "launcher" or not row.mapped:
        return "-"
    have = sum(1 for v in row.mapped.values() if v)
    if have == len(row.mapped):
        return "yes"
    return "no" if have == 0 else f"{have}/{len(row.mapped)}"


def _environ_cell(row: Row) -> str:
    if not row.environ_readable:
        return "(unreadable)"
    return row.environ_preload if row.environ_preload is not None else "(unset)"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def render_text(report: Report, out: IO[str]) -> None:
    out.write(
        f"looking for: {verify.libraries_text(report.libraries)}"
        f" (from {report.source or 'nowhere'})\n"
    )
    out.write(f"in: {report.scope}\n")
    env_cells = [_clip(_environ_cell(r), 40) for r in report.rows]
    env_w = max([len("ENVIRON LD_PRELOAD"), *map(len, env_cells)])
    pid_w = max([3, *(len(str(r.pid)) for r in report.rows)])
    out.write(f"{'PID':>{pid_w}}  MAPPED  {'ENVIRON LD_PRELOAD':<{env_w}}  PROCESS\n")
    for row, env_cell in zip(report.rows, env_cells, strict=True):
        tree = ("  " * (row.depth - 1) + "└─ ") if row.depth else ""
        line = (
            f"{row.pid:>{pid_w}}  {_mapped_cell(row):<6}  {env_cell:<{env_w}}  "
            f"{tree}{_clip(row.command, _COMMAND_WIDTH)}"
        )
        if row.note:
            line += f"   <- {row.note}"
        out.write(line + "\n")
    s = report.summary()
    missing = ", ".join(map(str, s["missing"]))
    out.write(
        f"{s['checked']} checked: {s['with_all']} with every library"
        + (f", {len(s['missing'])} without (pid {missing})" if s["missing"] else "")
        + (
            f"; {len(s['not_counted'])} not counted (vgpu-launch itself, static, setuid, exited)"
            if s["not_counted"]
            else ""
        )
        + "\n"
    )
    for p in report.problems:
        out.write(f"problem: {p}\n")
    out.write("status: " + ("ok" if report.ok else "NOT every process has the preload") + "\n")


def run(
    pid: int | None,
    unit: str | None,
    libs: list[str] | None,
    libs_source: str,
    fmt: str,
    *,
    unit_cgroup: str | None = None,
    out: IO[str] | None = None,
) -> int:
    out = out or sys.stdout
    try:
        report = collect(pid, unit_cgroup, libs, libs_source)
    except StatusError as exc:
        if fmt == "json":
            json.dump({"ok": False, "error": str(exc)}, out)
            out.write("\n")
        else:
            sys.stderr.write(f"vgpu-launch status: {exc}\n")
        return EXIT_USAGE
    if unit:
        report.scope = f"unit {unit} ({report.scope})"
    if fmt == "json":
        json.dump(report.as_json(), out, indent=2)
        out.write("\n")
    else:
        render_text(report, out)
    return 0 if report.ok else EXIT_PROBLEM_FOUND
