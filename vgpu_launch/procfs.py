"""Small /proc readers shared by the launcher and the diagnostics."""

from __future__ import annotations


def ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    return int(data[data.rindex(b")") + 2 :].split(None, 2)[1])


def status_field(pid: int | str, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == name:
                    return value.strip()
    except OSError:
        return None
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
