"""A systemd unit as ``systemctl show`` tells it, and the files it reads its environment from.

Shared by ``doctor --unit`` and ``status --unit``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

UNIT_PROPERTIES = (
    "Id",
    "LoadState",
    "ActiveState",
    "FragmentPath",
    "DropInPaths",
    "Type",
    "ExecStart",
    "KillMode",
    "NotifyAccess",
    "User",
    "Group",
    "DynamicUser",
    "SupplementaryGroups",
    "Environment",
    "EnvironmentFiles",
    "ControlGroup",
    "MainPID",
    "SystemCallFilter",
    "SystemCallErrorNumber",
    "SystemCallArchitectures",
    "NoNewPrivileges",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "ProtectKernelTunables",
    "PrivateDevices",
    "ProtectProc",
    "AppArmorProfile",
    "PrivateUsers",
    "ProtectHome",
    "PrivateTmp",
)


class UnitError(Exception):
    """systemctl is missing, or could not tell about the unit."""


@dataclass
class Unit:
    name: str
    props: dict[str, list[str]] = field(default_factory=dict)

    def get(self, key: str, default: str = "") -> str:
        values = self.props.get(key)
        return values[-1] if values else default

    def flag(self, key: str) -> bool:
        return self.get(key).lower() in ("yes", "true", "1", "on")

    @property
    def exec_start(self) -> list[list[str]]:
        """ExecStart commands as argv lists (from ``{ path=... ; argv[]=... ; ... }``)."""
        out = []
        for value in self.props.get("ExecStart", []):
            for m in re.finditer(r"argv\[\]=(.*?) ;", value):
                out.append(m.group(1).split())
        return out

    @property
    def environment(self) -> dict[str, str]:
        """Environment= then EnvironmentFile= (which wins, as in systemd)."""
        env: dict[str, str] = {}
        for value in self.props.get("Environment", []):
            try:
                items = shlex.split(value)
            except ValueError:
                items = value.split()
            for item in items:
                name, eq, val = item.partition("=")
                if eq:
                    env[name] = val
        for path in self.environment_files:
            env.update(read_environment_file(path))
        return env

    @property
    def environment_files(self) -> list[str]:
        files = []
        for value in self.props.get("EnvironmentFiles", []):
            for m in re.finditer(r"(\S+) \(ignore_errors=\w+\)", value):
                files.append(m.group(1))
        return files


def read_environment_file(path: str) -> dict[str, str]:
    """A systemd EnvironmentFile: KEY=VALUE lines, # and ; comments, shell-like quoting."""
    env: dict[str, str] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return env
    for line in lines:
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        name, eq, value = line.partition("=")
        if not eq:
            continue
        try:
            parts = shlex.split(value)
            value = " ".join(parts)
        except ValueError:
            pass
        env[name.strip()] = value
    return env


def systemctl() -> str | None:
    return shutil.which("systemctl")


def load_unit(name: str) -> Unit:
    exe = systemctl()
    if exe is None:
        raise UnitError("systemctl not found on PATH: --unit needs systemd's systemctl")
    try:
        proc = subprocess.run(
            [exe, "show", "--no-pager", f"--property={','.join(UNIT_PROPERTIES)}", "--", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise UnitError(f"systemctl show {name} failed: {exc}") from None
    if proc.returncode != 0:
        text = (proc.stderr or proc.stdout).strip().splitlines()
        raise UnitError(f"systemctl show {name} failed: {text[-1] if text else proc.returncode}")
    unit = Unit(name)
    for line in proc.stdout.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            unit.props.setdefault(key, []).append(value)
    if unit.get("LoadState") in ("not-found", "bad-setting", "error", "masked"):
        raise UnitError(f"unit {name}: LoadState={unit.get('LoadState')}")
    return unit
