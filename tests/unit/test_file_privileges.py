"""What executing a file grants (setuid, setgid, file capabilities), read the way the kernel
stores it, and what doctor is told about a vgpu-launch without CAP_SYS_PTRACE."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vgpu_launch import privileges

REPO = Path(__file__).resolve().parent.parent.parent
CAP_NET_RAW, CAP_SYS_ADMIN, CAP_BPF = 13, 21, 39


def _needs_root_tools() -> None:
    if os.geteuid() != 0 or shutil.which("setcap") is None or shutil.which("capsh") is None:
        pytest.fail("needs root and setcap/capsh (apt-get install libcap2-bin)", pytrace=False)


def test_file_capabilities_of_each_revision() -> None:
    """vfs_cap_data v1 (32 bits), v2 and v3 (64 bits, v3 with a root uid): the permitted set."""
    v1 = (0x01000000).to_bytes(4, "little") + (1 << CAP_NET_RAW).to_bytes(4, "little") + bytes(4)
    v2 = (
        (0x02000000 | 1).to_bytes(4, "little")
        + (1 << CAP_SYS_ADMIN).to_bytes(4, "little")
        + bytes(4)
        + (1 << (CAP_BPF - 32)).to_bytes(4, "little")
        + bytes(4)
    )
    v3 = v2.replace((0x02000001).to_bytes(4, "little"), (0x03000001).to_bytes(4, "little"))
    assert privileges.parse_file_caps(v1) == 1 << CAP_NET_RAW
    assert privileges.parse_file_caps(v2) == 1 << CAP_SYS_ADMIN | 1 << CAP_BPF
    assert privileges.parse_file_caps(v3 + bytes(4)) == 1 << CAP_SYS_ADMIN | 1 << CAP_BPF
    assert privileges.parse_file_caps(b"\x01") == 0
    assert [privileges.cap_name(c) for c in (CAP_NET_RAW, CAP_BPF, 63)] == [
        "cap_net_raw",
        "cap_bpf",
        "cap_63",
    ]


def test_what_executing_a_file_grants(tmp_path: Path) -> None:
    """The setuid owner, the setgid group (only with group execute: without, it is mandatory
    locking), and the file capabilities setcap wrote."""
    _needs_root_tools()
    files = {name: tmp_path / name for name in ("plain", "suid", "sgid", "lock", "fcap")}
    for path in files.values():
        shutil.copy("/bin/true", path)
        os.chown(path, 0, 65534)
    for name, mode in (
        ("plain", 0o755),
        ("suid", 0o4755),
        ("sgid", 0o2755),
        ("lock", 0o2745),
        ("fcap", 0o755),
    ):
        files[name].chmod(mode)
    subprocess.run(["setcap", "cap_net_raw,cap_bpf+ep", str(files["fcap"])], check=True)
    got = {name: privileges.file_privileges(str(path)) for name, path in files.items()}
    assert got["plain"] == privileges.FilePrivileges() and not got["plain"]
    assert got["suid"] == privileges.FilePrivileges(setuid=0)
    assert got["sgid"] == privileges.FilePrivileges(setgid=65534)
    assert got["lock"] == privileges.FilePrivileges()
    assert got["fcap"] == privileges.FilePrivileges(caps=1 << CAP_NET_RAW | 1 << CAP_BPF)
    assert privileges.file_privileges(str(tmp_path / "missing")) is None


def test_doctor_note_without_cap_sys_ptrace() -> None:
    """Root with CAP_SYS_PTRACE: nothing to say. Without it: one sentence naming the cause and
    what breaks."""
    _needs_root_tools()
    assert privileges.tracer_keeps_privileges()
    assert privileges.without_ptrace_capability() is None
    code = "from vgpu_launch import privileges as p; print(p.without_ptrace_capability())"
    out = subprocess.run(
        [
            "capsh",
            "--drop=cap_sys_ptrace",
            "--",
            "-c",
            'exec "$0" "$@"',
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert out.startswith("running as root without CAP_SYS_PTRACE, vgpu-launch cannot hand")
    assert "sudo" in out and "warning" in out
