"""The configuration in effect: command line over environment over file over defaults.

Every setting remembers where it came from, so the start event and ``doctor`` can say so.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import security
from .errors import ConfigError
from .options import (
    CONFIG_OPTION,
    DEFAULT_CONFIG,
    ENV_PREFIX,
    KNOWN_VARS,
    SETTINGS,
    Kind,
    is_variable_name,
    parse_assignment,
)
from .trace.policy import Policy

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class Config:
    preload: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    force_env: dict[str, str] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    log_format: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    no_follow: bool = False
    strict: bool = False
    allow_insecure: bool = False
    release_after_exec: list[str] = field(default_factory=list)
    strict_allow_release: bool = False
    ptrace_requests: bool = True
    config_file: str | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def policy(self) -> Policy:
        enc = os.fsencode
        return Policy(
            preload=tuple(enc(p) for p in self.preload),
            env=tuple((enc(k), enc(v)) for k, v in self.env.items()),
            force_env=tuple((enc(k), enc(v)) for k, v in self.force_env.items()),
            exclude=tuple(self.exclude),
        )

    @property
    def release_refused(self) -> bool:
        """Strict mode, without strict_allow_release: no process may be given back."""
        return self.strict and not self.strict_allow_release

    def summary(self) -> dict[str, Any]:
        # Names only: values are often credentials (API tokens); docs/security.md.
        return {
            "preload": self.preload,
            "env": sorted(self.env),
            "force_env": sorted(self.force_env),
            "exclude": self.exclude,
            "strict": self.strict,
            "no_follow": self.no_follow,
            "release_after_exec": self.release_after_exec,
            "strict_allow_release": self.strict_allow_release,
            "ptrace_requests": self.ptrace_requests,
            "config_file": self.config_file,
            "sources": self.sources,
        }


def _bool(text: str, where: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{where}: {text!r} is not a boolean (use 1/0, true/false, yes/no)")


def _from_text(key: str, text: str, where: str) -> Any:
    """A value as written in an environment variable."""
    kind = SETTINGS[key].kind
    if kind is Kind.PATHS:
        return [p for p in re.split(r"[:\s]+", text) if p]
    if kind is Kind.GLOBS:  # they hold spaces ("/usr/bin/ollama runner*"): separated by ';'
        return [p.strip() for p in text.split(";") if p.strip()]
    if kind is Kind.ASSIGNMENTS:
        return dict(parse_assignment(t, where) for t in text.split())
    if kind is Kind.BOOL:
        return _bool(text, where)
    return text


def _check(key: str, value: Any, where: str) -> Any:
    """Validate a value of ``key`` from any source and normalise it."""
    opt = SETTINGS[key]
    kind = opt.kind
    if kind is Kind.PATHS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of paths")
        for v in value:
            if not v.strip():
                raise ConfigError(f"{where}: {key} has an empty path")
            if key == "preload" and (":" in v or any(c.isspace() for c in v)):
                raise ConfigError(
                    f"{where}: preload path {v!r} contains ':' or whitespace, which ld.so "
                    "reads as separators; rename the file"
                )
        return list(value)
    if kind is Kind.GLOBS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of patterns")
        if any(not v.strip() for v in value):
            raise ConfigError(f"{where}: {key} has an empty pattern")
        return list(value)
    if kind is Kind.ASSIGNMENTS:
        if not isinstance(value, dict):
            raise ConfigError(f'{where}: {key} must be a table of NAME = "value"')
        for name, v in value.items():
            if not is_variable_name(name) or not isinstance(v, str):
                raise ConfigError(f'{where}: {key}.{name} must be NAME = "string"')
            if name == "LD_PRELOAD":
                raise ConfigError(f"{where}: set LD_PRELOAD with preload, not {key}")
        return dict(value)
    if kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false")
        return value
    if kind is Kind.CHOICE:
        if value not in opt.choices:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(opt.choices)}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value or None


def read_file(path: str, *, allow_insecure: bool = False) -> dict[str, Any]:
    """``allow_insecure``: from the command line or the environment only; the file's own
    ``allow_insecure`` cannot vouch for the file (docs/security.md)."""
    # here, not at the top: most runs read no file, and the parser costs a few ms of start-up
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            security.check_open(
                path, f.fileno(), "configuration file", allow_insecure=allow_insecure
            )
            loaded = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"configuration file {path}: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    data: dict[str, Any] = dict(loaded)
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise ConfigError(
            f"configuration file {path}: unknown key {unknown[0]!r} (known: {', '.join(SETTINGS)})"
        )
    return data


def load(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    config_path: str | None = None,
) -> Config:
    """Merge the sources. ``cli`` holds only the options given on the command line.

    The file is ``config_path`` (from --config), else $VGPU_LAUNCH_CONFIG, else the default
    path if it exists. Repeatable options (preload, env, ...) replace, not extend, a lower
    source's list: what the command line says is what runs. ``env``/``force_env`` merge per
    variable name, the higher source winning.
    """
    cfg = Config()
    layers: list[tuple[str, dict[str, Any]]] = []
    source_file = ""  # the file's label in sources ("file PATH"), if one is read

    path = config_path or environ.get(CONFIG_OPTION.env) or None
    if path or os.path.exists(DEFAULT_CONFIG):
        path = path or DEFAULT_CONFIG
        cfg.config_file = path
        insecure = SETTINGS["allow_insecure"].env
        override = bool(cli.get("allow_insecure")) or _bool(environ.get(insecure, ""), insecure)
        source_file = f"file {path}"
        layers.append((source_file, read_file(path, allow_insecure=override)))

    from_env: dict[str, Any] = {}
    for key, opt in SETTINGS.items():
        if opt.env in environ:
            from_env[key] = _from_text(key, environ[opt.env], opt.env)
    unknown = sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in KNOWN_VARS)
    if unknown:
        raise ConfigError(f"unknown environment variable {unknown[0]} (see vgpu-launch --help)")
    layers.append(("environment", from_env))
    layers.append(("command line", dict(cli)))

    for source, values in layers:
        for key, value in values.items():
            where = source if source != "environment" else SETTINGS[key].env
            # an error names the file the way read_file's own errors do
            value = _check(key, value, f"configuration {where}" if where == source_file else where)
            if SETTINGS[key].kind is Kind.ASSIGNMENTS:
                value = {**getattr(cfg, key), **value}  # per name: a higher source wins
            setattr(cfg, key, value)
            cfg.sources[key] = where
    if cfg.strict and cfg.exclude:
        raise ConfigError(
            f"strict mode (from {cfg.sources['strict']}) cannot be combined with exclude "
            f"(from {cfg.sources['exclude']}): an excluded program runs without the preload, "
            "which strict mode exists to prevent; drop one of the two"
        )
    if cfg.strict and cfg.release_after_exec:
        raise ConfigError(
            f"strict mode (from {cfg.sources['strict']}) cannot be combined with "
            f"release_after_exec (from {cfg.sources['release_after_exec']}): a released "
            "program's children are no longer followed, which strict mode exists to prevent; "
            "drop one of the two"
        )
    return cfg
