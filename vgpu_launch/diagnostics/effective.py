"""The configuration vgpu-launch would run with: here, or in a systemd unit (its ExecStart
options, Environment= and EnvironmentFile=), and where each value came from."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Config, load
from ..errors import LaunchError
from ..options import parse_launcher_known, split_command
from .systemd import Unit


def launcher_argv(argv: Sequence[str]) -> list[str] | None:
    """vgpu-launch's own arguments in an ExecStart command line, or None if it does not run
    vgpu-launch (directly, through env, or as ``python3 -m vgpu_launch``)."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "vgpu-launch":
            return list(argv[i + 1 :])
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in ("vgpu_launch", "vgpu_launch.cli"):
            return list(argv[i + 2 :])
    return None


@dataclass
class Effective:
    """The configuration vgpu-launch would run with, and where each value came from."""

    config: Config | None
    error: str | None
    environment_from: str  # "this environment" or "unit NAME"


def effective_config(
    preload: list[str] | None,
    config_path: str | None,
    unit: Unit | None,
    environ: Mapping[str, str] | None = None,
) -> Effective:
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
            labels[name] = (
                f"{name} (Environment= of {unit.name})"
                if name in inline
                else f"{name} (EnvironmentFile= of {unit.name})"
            )
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
        cfg.sources = {
            k: (f"ExecStart of {unit.name}" if v == "command line" else v)
            for k, v in cfg.sources.items()
        }
        if preload:
            cfg.sources["preload"] = "--preload of this command"
    return Effective(cfg, None, where)
