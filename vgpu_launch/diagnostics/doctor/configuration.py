"""The configuration in effect, each value with where it came from."""

from __future__ import annotations

from typing import Any

from ...config import Config
from ...options import DEFAULT_CONFIG, SETTINGS
from ..effective import Effective
from .result import FAIL, OK, Checks


def check_config(checks: Checks, eff: Effective, preload_given: bool) -> Config | None:
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
            checks.add(OK, f"config: {key}", f"{_show(value)} (from {cfg.sources[key]})")
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


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ":".join(value) if value else "(empty)"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "(empty)"
    return str(value)
