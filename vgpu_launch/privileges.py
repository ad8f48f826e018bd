"""What a traced program loses when vgpu-launch may not hand it privileges.

The kernel does not let a tracer gain privileges through its tracee: a program executed under
ptrace gets the identity of its setuid/setgid bits and its file capabilities only when the
tracer has CAP_SYS_PTRACE (root normally has it). Under a vgpu-launch without it (run as a
normal user, or as root with CAP_SYS_PTRACE dropped) such a program runs with the caller's
identity and capabilities instead: ``sudo`` fails ("effective uid is not 0"), ``ping`` lacks
``cap_net_raw``, ``passwd --status`` answers for the caller. The tracer asks ``lost`` at each
exec and logs what a program lost as a warning (docs/security.md).

A program that would lose its privileges anyway is not reported: with ``no_new_privs`` (systemd's
``NoNewPrivileges=yes``) the kernel ignores setuid bits and file capabilities for everyone.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from . import procfs
from .security import group_name, user_name

CAP_SYS_PTRACE = 19
# capability numbers from linux/capability.h, as capsh and getcap name them
CAP_NAMES = (
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
)
CAPABILITY_XATTR = "security.capability"
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_REVISION_1 = 0x01000000


def cap_name(cap: int) -> str:
    return CAP_NAMES[cap] if cap < len(CAP_NAMES) else f"cap_{cap}"


def _cap_set(value: str | None) -> int:
    try:
        return int(value or "0", 16)
    except ValueError:
        return 0


def tracer_keeps_privileges() -> bool:
    """Whether programs traced by this process keep their setuid/setgid identity and file
    capabilities: it has CAP_SYS_PTRACE."""
    return bool(_cap_set(procfs.status_field("self", "CapEff")) >> CAP_SYS_PTRACE & 1)


def without_ptrace_capability() -> str | None:
    """What ``vgpu-launch doctor`` says when vgpu-launch would run without CAP_SYS_PTRACE
    (as a normal user, or as root with the capability dropped); None when it has it."""
    if tracer_keeps_privileges():
        return None
    who = "as a user other than root" if os.geteuid() else "as root without CAP_SYS_PTRACE"
    return (
        f"running {who}, vgpu-launch cannot hand privileges to the programs it traces: "
        "setuid/setgid programs run with the caller's identity and programs with file "
        "capabilities without them (sudo fails, ping lacks cap_net_raw, passwd answers for "
        "the caller); each such exec is logged as a warning naming what it lost"
    )


@dataclass(frozen=True)
class FilePrivileges:
    """What executing a file would grant: the setuid owner, the setgid group, file caps."""

    setuid: int | None = None
    setgid: int | None = None
    caps: int = 0  # the permitted set of its security.capability attribute

    def __bool__(self) -> bool:
        return self.setuid is not None or self.setgid is not None or bool(self.caps)


def parse_file_caps(raw: bytes) -> int:
    """The permitted set of a ``security.capability`` value (vfs_cap_data, any revision)."""
    if len(raw) < 12:
        return 0
    magic = int.from_bytes(raw[0:4], "little")
    caps = int.from_bytes(raw[4:8], "little")
    if magic & _VFS_CAP_REVISION_MASK != _VFS_CAP_REVISION_1 and len(raw) >= 20:
        caps |= int.from_bytes(raw[12:16], "little") << 32
    return caps


def file_privileges(path: str) -> FilePrivileges | None:
    """What executing ``path`` would grant; None where the file cannot be looked at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    mode = st.st_mode
    try:
        caps = parse_file_caps(os.getxattr(path, CAPABILITY_XATTR))
    except OSError:
        caps = 0
    return FilePrivileges(
        setuid=st.st_uid if mode & stat.S_ISUID else None,
        # setgid without group execute is mandatory locking, not a setgid program
        setgid=st.st_gid if mode & stat.S_ISGID and mode & stat.S_IXGRP else None,
        caps=caps,
    )


def lost(pid: int, exe: str) -> list[str]:
    """What the program ``pid`` just executed (``exe``) should have been granted and was not:
    ``setuid root``, ``setgid shadow``, capability names. Empty when nothing was lost, or
    where it cannot be told."""
    granted = file_privileges(f"/proc/{pid}/exe")
    if granted is None and exe.startswith("/"):  # /proc/PID/exe is not ours to follow
        granted = file_privileges(exe)
    if not granted or procfs.status_field(pid, "NoNewPrivs") == "1":
        return []
    now = procfs.ids(pid)
    if now is None:
        return []
    out = []
    if granted.setuid is not None and now.euid != granted.setuid:
        out.append(f"setuid {user_name(granted.setuid)}")
    if granted.setgid is not None and now.egid != granted.setgid:
        out.append(f"setgid {group_name(granted.setgid)}")
    missing = granted.caps & ~_cap_set(procfs.status_field(pid, "CapPrm"))
    out.extend(cap_name(c) for c in range(64) if missing >> c & 1)
    return out
