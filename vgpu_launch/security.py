"""Refuse preload libraries and configuration files that someone else could change.

vgpu-launch puts the preload library into every process of the tree, and the configuration file
decides which library that is. If a user other than root or the user vgpu-launch runs as can
write the file, or any directory on the way to it, that user can run code as the service (as root,
for a service started as root). Like sshd's StrictModes, such a path is refused with a one-line
message naming the offending path, its mode and its owner; ``--allow-insecure`` (or
``VGPU_LAUNCH_ALLOW_INSECURE=1``, or ``allow_insecure = true`` in a configuration file that
passed this check itself) accepts it. docs/security.md explains every rule.

The path is walked the way the kernel resolves it, symbolic links included: every directory
entered and every link followed counts, not only the final file. A directory that others can
write is acceptable only with the sticky bit set (``/tmp``) and when the entry used in it
belongs to a trusted user, since nobody else can then rename or remove that entry.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import stat
import struct
from collections.abc import Collection
from dataclasses import dataclass

from .errors import ConfigError

_MAX_LINKS = 40  # as the kernel (MAXSYMLINKS)

# POSIX ACL extended attribute (linux/posix_acl_xattr.h)
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP_OBJ = 0x04
_ACL_GROUP = 0x08
_ACL_MASK = 0x10
_ACL_WRITE = 0x02

OVERRIDE = "--allow-insecure (or VGPU_LAUNCH_ALLOW_INSECURE=1)"


def trusted_uids() -> frozenset[int]:
    """Root and the user vgpu-launch runs as."""
    return frozenset({0, os.geteuid()})


@dataclass(frozen=True)
class Finding:
    path: str  # the offending path: the file, a directory on the way, or a symbolic link
    kind: str  # "file", "directory" or "symbolic link"
    st: os.stat_result
    why: str

    def describe(self) -> str:
        mode = stat.S_IMODE(self.st.st_mode)
        return (
            f"{self.kind} {self.path} (mode {mode:04o}, owner {_user(self.st.st_uid)}:"
            f"{_group(self.st.st_gid)}) {self.why}"
        )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _trusted_names(trusted: Collection[int]) -> str:
    return " or ".join(dict.fromkeys(_user(u) for u in sorted(trusted)))


@functools.cache
def _group_members(gid: int) -> frozenset[int] | None:
    """Users in group ``gid`` (supplementary members and users whose primary group it is);
    None when the group is unknown, so that nobody can tell who is in it."""
    try:
        names = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return None
    uids = {p.pw_uid for p in pwd.getpwall() if p.pw_gid == gid}
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            return None  # a member that cannot be resolved: not provably trusted
    return frozenset(uids)


def _group_untrusted(gid: int, trusted: Collection[int]) -> bool:
    members = _group_members(gid)
    return members is None or not members <= set(trusted)


def _acl_entries(path: str) -> list[tuple[int, int, int]]:
    try:
        raw = os.getxattr(path, _ACL_XATTR, follow_symlinks=False)
    except OSError:
        return []  # no ACL, or a file system without them
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != _ACL_VERSION:
        return []
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw) - 7, 8)]


def writers(path: str, st: os.stat_result, trusted: Collection[int]) -> str | None:
    """Who, besides the owner, can write ``path``: a phrase, or None if nobody untrusted."""
    mode = st.st_mode
    if mode & stat.S_IWOTH:
        return "is writable by every user"
    acl = _acl_entries(path)
    mask = next((perm for tag, perm, _ in acl if tag == _ACL_MASK), 0x7)
    if acl:
        group_obj = next((perm for tag, perm, _ in acl if tag == _ACL_GROUP_OBJ), 0)
        group_writes = bool(group_obj & mask & _ACL_WRITE)
    else:
        group_writes = bool(mode & stat.S_IWGRP)
    if group_writes and _group_untrusted(st.st_gid, trusted):
        return f"is writable by group {_group(st.st_gid)}, which has other members"
    for tag, perm, ident in acl:
        if not perm & mask & _ACL_WRITE:
            continue
        if tag == _ACL_USER and ident not in trusted:
            return f"is writable by user {_user(ident)} (ACL)"
        if tag == _ACL_GROUP and _group_untrusted(ident, trusted):
            return f"is writable by group {_group(ident)} (ACL)"
    return None


def find_problem(path: str, trusted: Collection[int] | None = None) -> Finding | None:
    """The first thing on the way to ``path`` that an untrusted user could change, or None.

    Raises OSError where the path cannot be resolved (the caller reports missing files).
    """
    trusted = trusted_uids() if trusted is None else frozenset(trusted)
    path = os.path.abspath(path)
    root = os.stat("/")
    found = _judge("/", root, "directory", trusted, sticky_parent=False)
    if found:
        return found
    cur = "/"
    cur_sticky_open = _sticky_open("/", root, trusted)
    todo = [c for c in path.split("/") if c]
    links = 0
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            cur = os.path.dirname(cur) if cur != "/" else "/"
            cur_sticky_open = _sticky_open(cur, os.stat(cur), trusted)
            continue
        entry = os.path.join(cur, name)
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            # A link cannot be changed, only replaced, which takes write access to its
            # directory (judged already); in a sticky directory its owner can replace it.
            if cur_sticky_open and st.st_uid not in trusted:
                return _judge(entry, st, "symbolic link", trusted, sticky_parent=True)
            links += 1
            if links > _MAX_LINKS:
                raise OSError(40, "Too many levels of symbolic links", path)
            target = os.readlink(entry)
            if target.startswith("/"):
                cur = "/"
                cur_sticky_open = _sticky_open("/", root, trusted)
            todo = [c for c in target.split("/") if c] + todo
            continue
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        found = _judge(entry, st, kind, trusted, sticky_parent=cur_sticky_open)
        if found:
            return found
        if todo:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(20, "Not a directory", entry)
            cur = entry
            cur_sticky_open = _sticky_open(entry, st, trusted)
    return None


def _sticky_open(path: str, st: os.stat_result, trusted: Collection[int]) -> bool:
    """A sticky directory that untrusted users can write (``/tmp``): usable only for entries
    owned by a trusted user."""
    return bool(st.st_mode & stat.S_ISVTX) and writers(path, st, trusted) is not None


def _judge(
    path: str,
    st: os.stat_result,
    kind: str,
    trusted: Collection[int],
    *,
    sticky_parent: bool,
) -> Finding | None:
    if st.st_uid not in trusted:
        why = f"is owned by {_user(st.st_uid)}, not {_trusted_names(trusted)}"
        if sticky_parent:
            why += " (in a sticky directory that others can write)"
        return Finding(path, kind, st, why)
    who = writers(path, st, trusted)
    if who is None:
        return None
    if kind == "directory" and st.st_mode & stat.S_ISVTX:
        return None  # sticky: entries in it are judged by their owner (sticky_parent)
    return Finding(path, kind, st, who)


def check(path: str, what: str, *, allow_insecure: bool = False, source: str = "") -> None:
    """Raise ConfigError (exit status 2) if an untrusted user could change ``path``.

    ``what`` names the file in the message ("preload library", "configuration file").
    With ``allow_insecure`` a problem is accepted.
    """
    try:
        found = find_problem(path)
    except OSError:
        return  # missing or unreadable: the caller's own checks say so
    if found is None:
        return
    if allow_insecure:
        return
    raise ConfigError(_message(path, what, found, source))


def check_open(path: str, fd: int, what: str, *, allow_insecure: bool = False,
               source: str = "") -> None:
    """``check`` for a file already open as ``fd``: also refuse it if the path no longer leads
    to the file that was opened (it was replaced in between)."""
    check(path, what, allow_insecure=allow_insecure, source=source)
    if allow_insecure:
        return
    try:
        now = os.stat(path)
    except OSError:
        now = None
    opened = os.fstat(fd)
    if now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
        raise ConfigError(f"{what} {path} was replaced while it was being read; try again")


def _message(path: str, what: str, found: Finding, source: str) -> str:
    where = f" (from {source})" if source else ""
    who = "root" if os.geteuid() == 0 else _user(os.geteuid())
    return (
        f"refusing {what} {path}{where}: {found.describe()}, so it could be made to run code "
        f"as {who} in every process of the tree; make the path owned by "
        f"{_trusted_names(trusted_uids())} and not writable by others, or accept the risk "
        f"with {OVERRIDE}"
    )
