"""The configuration in effect, each value with where it came from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...config import Config
from ...options import DEFAULT_CONFIG, SETTINGS, Kind, split_command
from ..effective import Effective
from .result import FAIL, OK, Checks

# The values of --env, --force-env and [env] may be secrets (tokens, passwords): doctor's
# output is pasted into tickets, so it shows their names unless asked for the values.
HIDDEN = "(hidden)"
_ASSIGNMENT_FLAGS = tuple(o.flag for o in SETTINGS.values() if o.kind is Kind.ASSIGNMENTS)


def hide_values(args: Sequence[str]) -> list[str]:
    """vgpu-launch's own arguments with the VALUE of each --env/--force-env NAME=VALUE
    replaced; CMD and its arguments (after the options) are left as they are."""
    options, _command = split_command(args)
    out: list[str] = []
    hide_next = False
    for arg in options:
        flag, eq, assignment = arg.partition("=")
        if hide_next:
            out.append(arg.partition("=")[0] + "=" + HIDDEN)
        elif eq and flag in _ASSIGNMENT_FLAGS:
            out.append(f"{flag}={assignment.partition('=')[0]}={HIDDEN}")
        else:
            out.append(arg)
        hide_next = not hide_next and arg in _ASSIGNMENT_FLAGS
    return [*out, *args[len(options) :]]


def check_config(
    checks: Checks, eff: Effective, preload_given: bool, show_values: bool = False
) -> Config | None:
    if eff.config is None:
        checks.add(
            FAIL,
            "config",
            eff.error or "cannot be read",
            "correct it (vgpu-launch --help lists the variables and keys)",
        )
        return None
    cfg = eff.config
    if cfg.config_file:
        checks.add(OK, "config: file", f"{cfg.config_file} read")
    else:
        checks.add(
            OK,
            "config: file",
            f"none ({DEFAULT_CONFIG} does not exist): command line and environment only",
        )
    for key in SETTINGS:
        if key in cfg.sources:
            value = getattr(cfg, key)
            shown = _show(value, hide=not show_values and SETTINGS[key].kind is Kind.ASSIGNMENTS)
            checks.add(OK, f"config: {key}", f"{shown} (from {cfg.sources[key]})")
    defaults = [k for k in SETTINGS if k not in cfg.sources]
    if defaults:
        checks.add(OK, "config: defaults", ", ".join(defaults))
    if not cfg.preload:
        checks.add(
            FAIL,
            "config: preload",
            "no preload library configured",
            f"give --preload PATH, set VGPU_LAUNCH_PRELOAD, or preload = [...] in {DEFAULT_CONFIG}",
        )
    return cfg


def _show(value: Any, *, hide: bool = False) -> str:
    if isinstance(value, list):
        return ":".join(value) if value else "(empty)"
    if isinstance(value, dict):
        if hide and value:
            return f"{' '.join(value)} (values hidden: --show-values shows them)"
        return " ".join(f"{k}={v}" for k, v in value.items()) or "(empty)"
    return str(value)
