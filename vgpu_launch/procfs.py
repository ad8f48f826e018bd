"""Every reader of /proc: the launcher, the tracer and the diagnostics parse it here only.

Readers return None (or an empty value) for a process that is gone, and say in their docstring
where they raise instead (PermissionError, for a caller that must tell "gone" from "hidden").
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
from collections.abc import Collection
from dataclasses import dataclass

from . import elf
from .trace.stack import AT_NULL, AT_SECURE

# ---------------------------------------------------------------------------------------------
# processes and threads


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat that vgpu-launch uses."""

    comm: str
    state: str  # R, S, D, T, t (ptrace stop), Z, ...
    ppid: int


def _parse_stat(data: bytes) -> Stat | None:
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    try:
        close = data.rindex(b")")
        comm = data[data.index(b"(") + 1 : close].decode(errors="replace")
        fields = data[close + 2 :].split(None, 2)
        return Stat(comm, fields[0].decode(), int(fields[1]))
    except (ValueError, IndexError):
        return None


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def stat(pid: int | str) -> Stat | None:
    data = _read(f"/proc/{pid}/stat")
    return None if data is None else _parse_stat(data)


def ppid(pid: int) -> int | None:
    found = stat(pid)
    return None if found is None else found.ppid


def status_field(pid: int | str, name: str) -> str | None:
    """One field of /proc/PID/status ("TracerPid", "Uid", "Seccomp", ...), stripped."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == name:
                    return value.strip()
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class Ids:
    """The real and effective user and group ids of a process."""

    uid: int
    euid: int
    gid: int
    egid: int

    @property
    def set_id(self) -> bool:
        """Effective ids differ from the real ones: after an exec, the program runs setuid or
        setgid, and so with AT_SECURE."""
        return self.uid != self.euid or self.gid != self.egid


def ids(pid: int | str) -> Ids | None:
    uid = (status_field(pid, "Uid") or "").split()
    gid = (status_field(pid, "Gid") or "").split()
    try:
        return Ids(int(uid[0]), int(uid[1]), int(gid[0]), int(gid[1]))
    except (IndexError, ValueError):
        return None


def tracer_pid(pid: int | str) -> int | None:
    """The pid tracing ``pid`` (0: none); None where it cannot be read."""
    value = status_field(pid, "TracerPid")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def comm(pid: int | str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def id_map(kind: str, pid: int | str = "self") -> list[tuple[int, int, int]]:
    """``/proc/PID/uid_map`` or ``gid_map`` (``kind``: "uid" or "gid"): (first id inside, first
    id outside, count) per line. Unreadable: the identity map of the initial user namespace."""
    try:
        with open(f"/proc/{pid}/{kind}_map") as f:
            return [(int(a), int(b), int(c)) for a, b, c in (line.split() for line in f)]
    except (OSError, ValueError):
        return [(0, 0, 4294967295)]


def overflow_id(kind: str) -> int:
    """The id that stat() shows for an owner not mapped into the caller's user namespace
    (``/proc/sys/kernel/overflowuid`` or ``overflowgid``; 65534 unless changed)."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


def pids() -> list[int]:
    """Every process visible in /proc."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def tasks(pid: int) -> list[int]:
    """The threads of ``pid``; empty when it is gone."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def cpu_use(pid: int, tid: int | None = None) -> tuple[bool, int | None]:
    """Whether a thread of ``pid`` (or thread ``tid`` alone) is running or waits only for a
    CPU (state R), and the CPU time those threads have had, in ns (``schedstat``; None where
    the kernel does not keep it). A thread in state R may be in the middle of a system call
    that has not finished its work yet; one that waits for a CPU uses none."""
    if pid <= 0:
        return False, None
    running, total = False, 0
    for t in tasks(pid) if tid is None else [tid]:
        found = stat(f"{pid}/task/{t}")
        running = running or (found is not None and found.state == "R")
        data = _read(f"/proc/{pid}/task/{t}/schedstat")
        with contextlib.suppress(ValueError, IndexError):
            total += int((data or b"").split()[0])
    return running, total or None  # all 0: schedstat is off


def fd_targets(pid: int | str = "self") -> list[str]:
    """What each open descriptor of ``pid`` refers to (paths, "pipe:[N]", "/memfd:NAME ...")."""
    out: list[str] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def is_thread_of(pid: int, tid: int) -> bool:
    return tid == pid or os.path.exists(f"/proc/{pid}/task/{tid}")


def cmdline(pid: int) -> list[str] | None:
    data = _read(f"/proc/{pid}/cmdline")
    if data is None:
        return None
    argv = [a.decode(errors="replace") for a in data.split(b"\0")]
    if argv and argv[-1] == "":
        argv.pop()
    return argv


def environ(pid: int) -> dict[str, str] | None:
    """The environment ``pid`` was started with (never the one put in at its exec event)."""
    data = _read(f"/proc/{pid}/environ")
    if data is None:
        return None
    out: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq:
            out.setdefault(name.decode(errors="replace"), value.decode(errors="replace"))
    return out


def exe(pid: int | str) -> str:
    """The program ``pid`` runs. Raises OSError (gone, or not ours to look at)."""
    return os.readlink(f"/proc/{pid}/exe")


def exe_or_empty(pid: int | str) -> str:
    try:
        return exe(pid)
    except OSError:
        return ""


def stack_limit(pid: int) -> int | None:
    """The soft RLIMIT_STACK of ``pid`` from /proc/PID/limits (readable where prlimit() on
    another user's process is refused); resource.RLIM_INFINITY for unlimited."""
    data = _read(f"/proc/{pid}/limits")
    for line in (data or b"").decode(errors="replace").splitlines():
        if line.startswith("Max stack size"):
            soft = line[len("Max stack size") :].split()[0]
            return resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
    return None


# ---------------------------------------------------------------------------------------------
# signals


def _signal_set(hexmask: bytes) -> frozenset[int]:
    bits = int(hexmask, 16)
    return frozenset(s for s in range(1, 65) if bits >> (s - 1) & 1)


def shared_pending(pid: int) -> frozenset[int]:
    """The process-directed signals pending in ``pid`` (ShdPnd of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"ShdPnd:"):
                    return _signal_set(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return frozenset()


# ---------------------------------------------------------------------------------------------
# what a process has mapped, and how it runs

# glibc's libc, which ld.so maps (not the kernel) after the LD_PRELOAD objects
_LIBC = re.compile(r"libc(?:\.so\.6|-\d[.\d]*\.so)$")
# the dynamic loader, mapped by the kernel at exec; musl's is its libc (ld-musl-*.so.1 is a
# link to .../x86_64-linux-musl/libc.so, and the maps show the link's target)
_INTERP = re.compile(r"ld-linux[-.\w]*\.so|ld-musl-[-\w]+\.so|ld(?:64)?\.so\.\d")
DELETED = " (deleted)"


@dataclass(frozen=True)
class Maps:
    """The file-backed mappings of one process."""

    paths: frozenset[str]
    inodes: frozenset[tuple[int, int]]  # (st_dev, st_ino)
    interp: str | None  # the dynamic loader mapped into it, if any
    libc: bool  # glibc's libc is mapped: ld.so has dealt with LD_PRELOAD

    @property
    def musl(self) -> bool:
        return self.interp is not None and "musl" in self.interp

    def by_basename(self, name: str) -> list[str]:
        return sorted(p for p in self.paths if os.path.basename(p) == name)


def parse_maps(text: str) -> Maps:
    paths: set[str] = set()
    inodes: set[tuple[int, int]] = set()
    interp: str | None = None
    libc = False
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5]
        if path.endswith(DELETED):
            path = path[: -len(DELETED)]
        paths.add(path)
        ino = int(parts[4])
        if ino:
            major, _, minor = parts[3].partition(":")
            with contextlib.suppress(ValueError):
                inodes.add((os.makedev(int(major, 16), int(minor, 16)), ino))
        base = os.path.basename(path)
        if interp is None and (_INTERP.match(base) or (base == "libc.so" and "musl" in path)):
            interp = path
        if _LIBC.match(base):
            libc = True
    return Maps(frozenset(paths), frozenset(inodes), interp, libc)


def maps_text(pid: int | str) -> str | None:
    """/proc/PID/maps as text; None if the process is gone ("" for a zombie).

    Raises PermissionError where this user may not read it."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def read_maps(pid: int | str) -> Maps | None:
    """The mappings of ``pid``; None if it is gone or a zombie (which has none).

    Raises PermissionError where this user may not read them."""
    text = maps_text(pid)
    return parse_maps(text) if text else None


def auxv(pid: int | str, word: int) -> dict[int, int] | None:
    """The auxiliary vector of ``pid``, a ``word``-byte program; None where unreadable."""
    data = _read(f"/proc/{pid}/auxv")
    if not data:
        return None
    out: dict[int, int] = {}
    step = 2 * word
    for off in range(0, len(data) - step + 1, step):
        key = int.from_bytes(data[off : off + word], "little")
        if key == AT_NULL:
            break
        out.setdefault(key, int.from_bytes(data[off + word : off + step], "little"))
    return out


def secure(pid: int | str, word: int) -> bool | None:
    """AT_SECURE from the auxiliary vector: the program runs setuid/setgid or with file
    capabilities, and ld.so ignores LD_PRELOAD entries that contain a slash. None: unreadable."""
    found = auxv(pid, word)
    return None if found is None else found.get(AT_SECURE, 0) != 0


def exe_word(pid: int | str, maps: Maps | None = None) -> tuple[int | None, bool | None]:
    """(word size, static) of the program ``pid`` runs; None where it cannot be told. Without
    access to the file, the dynamic loader in ``maps`` tells."""
    word: int | None = None
    static: bool | None = None
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            header = elf.parse_header(f.read(elf.HEADER_SIZE))
            if header is not None:
                word = header.word
                static = not elf.has_interp(f, header)
    except OSError:
        pass
    if maps is not None:
        if static is None:
            static = maps.interp is None
        if word is None and maps.interp is not None:
            # here, not at the top: register access needs python-ptrace, and procfs is
            # imported on the way to the one-line message that says it is missing
            from . import arch

            native = arch.NATIVE
            found = native.word_of_loader(maps.interp) if native is not None else None
            word = found or 8
    return word, static


# ---------------------------------------------------------------------------------------------
# the host


def cgroup_members(cgroup: str) -> set[int]:
    """Every process whose systemd cgroup (the unified hierarchy's, or the legacy name=systemd
    one) is ``cgroup`` or below it. Read from /proc/PID/cgroup: no cgroupfs mount needed."""
    cg = cgroup.rstrip("/") or "/"
    members: set[int] = set()
    for pid in pids():
        data = _read(f"/proc/{pid}/cgroup")
        if data is None:
            continue
        for line in data.decode(errors="replace").splitlines():
            hid, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if not ((hid == "0" and controllers == "") or controllers == "name=systemd"):
                continue
            if path == cg or path.startswith(cg.rstrip("/") + "/"):
                members.add(pid)
                break
    return members


def yama_ptrace_scope() -> str | None:
    """kernel.yama.ptrace_scope ("0" to "3"); None without Yama."""
    data = _read("/proc/sys/kernel/yama/ptrace_scope")
    return None if data is None else data.decode(errors="replace").strip()


def owed_stop(pid: int, sig: int, parked: Collection[int]) -> bool:
    """Whether a thread of ``pid`` (a tracee) may hold ``sig`` in a ptrace stop the tracer has
    not dealt with yet: a stop not yet reported for ``sig`` (``exit_code`` of
    /proc/PID/task/TID/stat, the last field, is the signal until the tracer's ``waitpid``
    takes it), or one reported (0) and not ended. Threads the tracer parked in
    ``PTRACE_LISTEN`` (group-stopped, they hold no signal) are not waited for."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if not fields or fields[0] != b"t":
            continue
        # Unreadable (no permission: shown as 0, or an old kernel): as if reported.
        code = int(fields[49]) if len(fields) >= 50 and fields[49].isdigit() else 0
        if code == sig or (code == 0 and int(tid) not in parked):
            return True
    return False


def tgid_of(tid: int) -> int | None:
    value = status_field(tid, "Tgid")
    return int(value) if value and value.isdigit() else None


def tracer_of(pid: int | str) -> int:
    """The thread id that traces ``pid`` (a thread: "PID" or "PID/task/TID"), 0 if none."""
    value = status_field(pid, "TracerPid")
    return int(value) if value and value.isdigit() else 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before children."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = ppid(int(name))
            if parent is not None:
                kids.setdefault(parent, []).append(int(name))
    out: list[int] = []
    todo = sorted(kids.get(pid, []))
    while todo:
        p = todo.pop(0)
        if p not in out:
            out.append(p)
            todo.extend(sorted(kids.get(p, [])))
    return out
