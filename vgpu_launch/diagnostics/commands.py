"""``vgpu-launch doctor`` and ``vgpu-launch status``: argument parsing and what both share (a
systemd unit's properties, the configuration in effect for the launcher or for a unit)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, load
from ..errors import EXIT_USAGE, LaunchError
from ..options import parse_launcher_known, split_command, subcommand_parser

UNIT_PROPERTIES = (
    "Id", "LoadState", "ActiveState", "FragmentPath", "DropInPaths", "Type", "ExecStart",
    "KillMode", "NotifyAccess", "User", "Group", "DynamicUser", "SupplementaryGroups",
    "Environment", "EnvironmentFiles", "ControlGroup", "MainPID", "SystemCallFilter",
    "SystemCallErrorNumber", "SystemCallArchitectures", "NoNewPrivileges",
    "CapabilityBoundingSet", "ProtectKernelTunables", "PrivateDevices", "ProtectProc",
    "AppArmorProfile", "PrivateUsers", "ProtectHome", "PrivateTmp",
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
            capture_output=True, text=True, timeout=30, check=False,
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


def launcher_argv(argv: Sequence[str]) -> list[str] | None:
    """vgpu-launch's own arguments in an ExecStart command line, or None if it does not run
    vgpu-launch (directly, through env, or as ``python3 -m vgpu_launch``)."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "vgpu-launch":
            return list(argv[i + 1 :])
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in ("vgpu_launch",
                                                                  "vgpu_launch.cli"):
            return list(argv[i + 2 :])
    return None


@dataclass
class Effective:
    """The configuration vgpu-launch would run with, and where each value came from."""

    config: Config | None
    error: str | None
    environment_from: str  # "this environment" or "unit NAME"


def effective_config(preload: list[str] | None, config_path: str | None,
                     unit: Unit | None, environ: Mapping[str, str] | None = None) -> Effective:
    cli: dict[str, Any] = {}
    env: Mapping[str, str] = os.environ if environ is None else environ
    where = "this environment"
    labels: dict[str, str] = {}
    if unit is not None:
        where = f"unit {unit.name}"
        env = unit.environment
        inline: set[str] = set()
        for value in unit.props.get("Environment", []):
            inline.update(item.partition("=")[0] for item in value.split())
        for name in env:
            labels[name] = (f"{name} (Environment= of {unit.name})" if name in inline
                            else f"{name} (EnvironmentFile= of {unit.name})")
        for argv in unit.exec_start:
            args = launcher_argv(argv)
            if args is not None:
                options, _ = split_command(args)
                try:
                    cli, unit_config = parse_launcher_known(options)
                except LaunchError as exc:
                    return Effective(None, f"ExecStart of {unit.name}: {exc}", where)
                config_path = config_path or unit_config
                break
    if preload:
        cli = {**cli, "preload": list(preload)}
    try:
        cfg = load(cli, env, config_path=config_path)
    except LaunchError as exc:
        return Effective(None, str(exc), where)
    if labels:
        cfg.sources = {k: labels.get(v, v) for k, v in cfg.sources.items()}
    if unit is not None:
        cfg.sources = {k: (f"ExecStart of {unit.name}" if v == "command line" else v)
                       for k, v in cfg.sources.items()}
        if preload:
            cfg.sources["preload"] = "--preload of this command"
    return Effective(cfg, None, where)


# ---------------------------------------------------------------------------------------------
# the command line


def main(name: str, args: Sequence[str]) -> int:
    try:
        if name == "doctor":
            ns = subcommand_parser(name).parse_args(list(args))
            from . import doctor

            return doctor.run(ns.preload, ns.unit, ns.config, ns.format)
        if name == "status":
            ns = subcommand_parser(name).parse_args(list(args))
            if ns.pid is not None and ns.unit:
                raise LaunchError("vgpu-launch status: give PID or --unit, not both", EXIT_USAGE)
            return _status(ns)
    except LaunchError as exc:
        sys.stderr.write(f"{exc}\n")
        return exc.code
    except BrokenPipeError:
        return 0
    sys.stderr.write(f"vgpu-launch: unknown subcommand {name}\n")
    return EXIT_USAGE


def _status(ns: argparse.Namespace) -> int:
    from . import status

    unit: Unit | None = None
    cgroup: str | None = None
    if ns.unit:
        try:
            unit = load_unit(ns.unit)
        except UnitError as exc:
            sys.stderr.write(f"vgpu-launch status: {exc}\n")
            return EXIT_USAGE
        cgroup = unit.get("ControlGroup")
        if not cgroup:
            sys.stderr.write(f"vgpu-launch status: unit {ns.unit} has no cgroup (not running)\n")
            return EXIT_USAGE
    libs: list[str] | None = None
    source = ""
    if ns.preload:
        libs, source = list(ns.preload), "--preload"
    else:
        eff = effective_config(None, ns.config, unit)
        if eff.config is not None and eff.config.preload:
            libs = eff.config.preload
            source = eff.config.sources.get("preload", "configuration")
        elif eff.error:
            sys.stderr.write(f"vgpu-launch status: configuration not used: {eff.error}\n")
    return status.run(ns.pid, ns.unit, libs, source, ns.format, unit_cgroup=cgroup)
