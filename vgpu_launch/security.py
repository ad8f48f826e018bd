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

Inside a user namespace (a rootless container, ``unshare -U``, bwrap), a file whose owner is not
mapped into the namespace shows as owned by the overflow uid (``nobody``): host files, and shims
bind-mounted from the host, look like that. Nobody in the namespace can act as that owner, so it
is accepted like a trusted one, unless group or others can write the file, and the start event
carries a note saying so. This holds only while the overflow uid is itself unmapped: where the
namespace maps a user to it, such a file cannot be told from one of that user's, and is refused.
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

from . import procfs
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

# Problems found and accepted because of the override, for the start event to report.
overridden: list[str] = []
# Paths accepted because their owner is outside this user namespace, for the start event.
notes: list[str] = []

_INITIAL_MAP = [(0, 0, 4294967295)]


@dataclass(frozen=True)
class UserNamespace:
    """The user namespace this process runs in, as far as file ownership goes."""

    uid_map: tuple[tuple[int, int, int], ...]
    gid_map: tuple[tuple[int, int, int], ...]
    overflow_uid: int
    overflow_gid: int

    @property
    def initial(self) -> bool:
        return list(self.uid_map) == _INITIAL_MAP

    @staticmethod
    def _mapped(ident: int, ranges: tuple[tuple[int, int, int], ...]) -> bool:
        return any(first <= ident < first + count for first, _, count in ranges)

    def outside_owner(self, uid: int) -> bool:
        """A file of this uid belongs to a user outside the namespace: nobody inside can act as
        its owner. True only for the overflow uid, and only while no user is mapped to it."""
        return uid == self.overflow_uid and not self._mapped(uid, self.uid_map)

    def ambiguous_owner(self, uid: int) -> bool:
        """The overflow uid, mapped to a user here: a file of someone outside looks the same."""
        return not self.initial and uid == self.overflow_uid and self._mapped(uid, self.uid_map)

    def outside_group(self, gid: int) -> bool:
        """A group not mapped into the namespace: processes inside may still hold it as a
        supplementary group (inherited, and setgroups cannot drop it), so its members are
        unknown."""
        return gid == self.overflow_gid and not self._mapped(gid, self.gid_map)

    def outside_id(self, uid: int) -> int | None:
        """What ``uid`` is outside the namespace (in the parent's terms), if it is mapped."""
        for first, outside, count in self.uid_map:
            if first <= uid < first + count:
                return outside + uid - first
        return None


@functools.cache
def user_namespace() -> UserNamespace:
    return UserNamespace(
        tuple(procfs.id_map("uid")),
        tuple(procfs.id_map("gid")),
        procfs.overflow_id("uid"),
        procfs.overflow_id("gid"),
    )


def start_fields() -> dict[str, list[str]]:
    """What the start event reports of these checks: accepted paths of outside owners
    (``notes``), problems accepted only because of the override (``insecure_accepted``)."""
    out = {}
    if notes:
        out["notes"] = list(dict.fromkeys(notes))
    if overridden:
        out["insecure_accepted"] = list(dict.fromkeys(overridden))
    return out


def trusted_uids() -> frozenset[int]:
    """Root and the user vgpu-launch runs as."""
    return frozenset({0, os.geteuid()})


@dataclass(frozen=True)
class Finding:
    path: str  # the offending path: the file, a directory on the way, or a symbolic link
    kind: str  # "file", "directory" or "symbolic link"
    st: os.stat_result
    why: str
    outside: bool = False  # owned by a user outside this user namespace (see the module doc)
    ambiguous: bool = False  # owned by the overflow uid while a user is mapped to it

    def describe(self) -> str:
        mode = stat.S_IMODE(self.st.st_mode)
        where = ", a user outside this user namespace" if self.outside else ""
        return (
            f"{self.kind} {self.path} (mode {mode:04o}, owner {user_name(self.st.st_uid)}:"
            f"{group_name(self.st.st_gid)}{where}) {self.why}"
        )

    def fix(self, owners: str) -> str:
        """What to do about it; ``owners``: who may own the path ("root", "root (or ollama)")."""
        if self.outside:
            # chown and chmod need its owner, who is not in this namespace: only outside.
            return (
                f"make {self.path} not writable by others where it comes from (chmod go-w "
                "on the host, or in the image it is mounted from): nobody in this user "
                "namespace can change it"
            )
        if self.ambiguous:
            return (
                f"make the path owned by {owners} and not writable by others (in the image, "
                f"for one), or map no user to uid {self.st.st_uid} in this user namespace, "
                "so that a file of a user outside it is told apart"
            )
        return f"make the path owned by {owners} and not writable by others"


def user_name(uid: int) -> str:
    """The name of ``uid``, or the number where it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The name of ``gid``, or the number where it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _trusted_names(trusted: Collection[int]) -> str:
    return " or ".join(dict.fromkeys(user_name(u) for u in sorted(trusted)))


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
    if user_namespace().outside_group(gid):
        return True
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
        return f"is writable by group {group_name(st.st_gid)}, which has other members"
    for tag, perm, ident in acl:
        if not perm & mask & _ACL_WRITE:
            continue
        if tag == _ACL_USER and ident not in trusted:
            return f"is writable by user {user_name(ident)} (ACL)"
        if tag == _ACL_GROUP and _group_untrusted(ident, trusted):
            return f"is writable by group {group_name(ident)} (ACL)"
    return None


@dataclass(frozen=True)
class Walk:
    finding: Finding | None  # the first problem on the way, or None
    outside: tuple[str, ...]  # paths accepted because their owner is outside the namespace


def find_problem(path: str, trusted: Collection[int] | None = None) -> Finding | None:
    """The first thing on the way to ``path`` that an untrusted user could change, or None.

    Raises OSError where the path cannot be resolved (the caller reports missing files).
    """
    return walk(path, trusted).finding


def walk(path: str, trusted: Collection[int] | None = None) -> Walk:
    """``find_problem``, also naming the paths accepted only because their owner is outside
    this user namespace."""
    trusted = trusted_uids() if trusted is None else frozenset(trusted)
    outside: list[str] = []

    def done(found: Finding | None) -> Walk:
        return Walk(found, tuple(dict.fromkeys(outside)))

    path = os.path.abspath(path)
    root = os.stat("/")
    found = _judge("/", root, "directory", trusted, sticky_parent=False, outside=outside)
    if found:
        return done(found)
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
                if not user_namespace().outside_owner(st.st_uid):
                    return done(
                        _judge(
                            entry, st, "symbolic link", trusted, sticky_parent=True, outside=outside
                        )
                    )
                outside.append(entry)
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
        found = _judge(entry, st, kind, trusted, sticky_parent=cur_sticky_open, outside=outside)
        if found:
            return done(found)
        if todo:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(20, "Not a directory", entry)
            cur = entry
            cur_sticky_open = _sticky_open(entry, st, trusted)
    return done(None)


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
    outside: list[str],
) -> Finding | None:
    ns = user_namespace()
    is_outside = st.st_uid not in trusted and ns.outside_owner(st.st_uid)
    if st.st_uid not in trusted and not is_outside:
        why = f"is owned by {user_name(st.st_uid)}, not {_trusted_names(trusted)}"
        ambiguous = ns.ambiguous_owner(st.st_uid)
        if ambiguous:
            why += (
                f" (uid {st.st_uid} is also the overflow uid, which files of users outside "
                "this user namespace show: with a user mapped to it here, the two cannot "
                "be told apart)"
            )
        if sticky_parent:
            why += " (in a sticky directory that others can write)"
        return Finding(path, kind, st, why, ambiguous=ambiguous)
    who = writers(path, st, trusted)
    if who is not None and not (kind == "directory" and st.st_mode & stat.S_ISVTX):
        return Finding(path, kind, st, who, outside=is_outside)
    # (a sticky directory: entries in it are judged by their owner, sticky_parent)
    if is_outside:
        outside.append(path)
    return None


def check(path: str, what: str, *, allow_insecure: bool = False, source: str = "") -> str | None:
    """Raise ConfigError (exit status 2) if an untrusted user could change ``path``.

    ``what`` names the file in the message ("preload library", "configuration file").
    With ``allow_insecure`` the problem is only recorded in ``overridden``. Returns a note
    (also recorded in ``notes``) when the path was accepted only because some of it belongs
    to a user outside this user namespace.
    """
    try:
        result = walk(path)
    except OSError:
        return None  # missing or unreadable: the caller's own checks say so
    found = result.finding
    if found is not None:
        message = _message(path, what, found, source)
        if not allow_insecure:
            raise ConfigError(message)
        overridden.append(message)
    if not result.outside:
        return None
    ns = user_namespace()
    note = (
        f"{what} {path}: accepted {', '.join(result.outside)}, owned by uid "
        f"{ns.overflow_uid} (the overflow uid: a user outside this user namespace, whom "
        "nobody in it can act as) and not writable by others"
    )
    notes.append(note)
    return note


def check_open(
    path: str, fd: int, what: str, *, allow_insecure: bool = False, source: str = ""
) -> None:
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
    return (
        f"refusing {what} {path}{where}: {found.describe()}, so it could be made to run code "
        f"as {_who()} in every process of the tree; {found.fix(_trusted_names(trusted_uids()))}"
        f", or accept the risk with {OVERRIDE}"
    )


def _who() -> str:
    """Whom code in the tree runs as: inside a user namespace, root is not the host's."""
    euid = os.geteuid()
    name = "root" if euid == 0 else user_name(euid)
    ns = user_namespace()
    if ns.initial:
        return name
    outer = ns.outside_id(euid)
    return f"{name} of this user namespace" + (
        f" (uid {outer} outside it)" if outer is not None else ""
    )
