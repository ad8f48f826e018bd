"""The configuration in effect: command line over environment over file over defaults.

Every setting remembers where it came from, so the start event and ``doctor`` can say so.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import security
from .errors import ConfigError
from .trace.policy import Policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = "/etc/vgpu-launch/vgpu-launch.conf"
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# key: (type, environment variable)
KEYS: dict[str, tuple[str, str]] = {
    "preload": ("paths", "VGPU_LAUNCH_PRELOAD"),
    "env": ("assignments", "VGPU_LAUNCH_ENV"),
    "force_env": ("assignments", "VGPU_LAUNCH_FORCE_ENV"),
    "exclude": ("paths", "VGPU_LAUNCH_EXCLUDE"),
    "log_format": ("choice", "VGPU_LAUNCH_LOG_FORMAT"),
    "log_level": ("choice", "VGPU_LAUNCH_LOG_LEVEL"),
    "log_file": ("path", "VGPU_LAUNCH_LOG_FILE"),
    "no_follow": ("bool", "VGPU_LAUNCH_NO_FOLLOW"),
    "strict": ("bool", "VGPU_LAUNCH_STRICT"),
    "allow_insecure": ("bool", "VGPU_LAUNCH_ALLOW_INSECURE"),
    "release_after_exec": ("globs", "VGPU_LAUNCH_RELEASE_AFTER_EXEC"),
    "strict_allow_release": ("bool", "VGPU_LAUNCH_STRICT_ALLOW_RELEASE"),
    "ptrace_requests": ("bool", "VGPU_LAUNCH_PTRACE_REQUESTS"),
}
# Read elsewhere: the file's path, the test hook, bin/vgpu-launch's choice of interpreter.
NON_OPTION_VARS = ("VGPU_LAUNCH_CONFIG", "VGPU_LAUNCH_TEST_FAULT", "VGPU_LAUNCH_PYTHON")
CHOICES = {"log_format": LOG_FORMATS, "log_level": LOG_LEVELS}


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

    def summary(self) -> dict[str, Any]:
        return {
            "preload": self.preload,
            "env": self.env,
            "force_env": self.force_env,
            "exclude": self.exclude,
            "strict": self.strict,
            "no_follow": self.no_follow,
            "release_after_exec": self.release_after_exec,
            "strict_allow_release": self.strict_allow_release,
            "ptrace_requests": self.ptrace_requests,
            "config_file": self.config_file,
            "sources": self.sources,
        }


def _assignment(text: str, where: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not _NAME.match(name):
        raise ConfigError(f"{where}: {text!r} is not NAME=VALUE (NAME: letters, digits, _)")
    return name, value


def _bool(text: str, where: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{where}: {text!r} is not a boolean (use 1/0, true/false, yes/no)")


def _from_text(key: str, text: str, where: str) -> Any:
    """A value as written in an environment variable."""
    kind = KEYS[key][0]
    if kind == "paths":
        return [p for p in re.split(r"[:\s]+", text) if p]
    if kind == "globs":  # they hold spaces ("/usr/bin/ollama runner*"): separated by ';'
        return [p.strip() for p in text.split(";") if p.strip()]
    if kind == "assignments":
        return dict(_assignment(t, where) for t in text.split())
    if kind == "bool":
        return _bool(text, where)
    return text


def _check(key: str, value: Any, where: str) -> Any:
    """Validate a value of ``key`` from any source and normalise it."""
    kind = KEYS[key][0]
    if kind == "paths":
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
    if kind == "globs":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of patterns")
        if any(not v.strip() for v in value):
            raise ConfigError(f"{where}: {key} has an empty pattern")
        return list(value)
    if kind == "assignments":
        if not isinstance(value, dict):
            raise ConfigError(f'{where}: {key} must be a table of NAME = "value"')
        for name, v in value.items():
            if not _NAME.match(name) or not isinstance(v, str):
                raise ConfigError(f'{where}: {key}.{name} must be NAME = "string"')
            if name == "LD_PRELOAD":
                raise ConfigError(f"{where}: set LD_PRELOAD with preload, not {key}")
        return dict(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false")
        return value
    if kind == "choice":
        if value not in CHOICES[key]:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(CHOICES[key])}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value or None


def read_file(path: str, *, allow_insecure: bool = False) -> dict[str, Any]:
    """``allow_insecure``: from the command line or the environment only; the file's own
    ``allow_insecure`` cannot vouch for the file (docs/security.md)."""
    try:
        with open(path, "rb") as f:
            security.check_open(path, f.fileno(), "configuration file",
                                allow_insecure=allow_insecure)
            loaded = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {path}: not UTF-8 ({exc.reason} at byte "
                          f"{exc.start})") from None
    data: dict[str, Any] = dict(loaded)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(
            f"configuration file {path}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})"
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

    path = config_path or environ.get("VGPU_LAUNCH_CONFIG") or None
    if path or os.path.exists(DEFAULT_CONFIG):
        path = path or DEFAULT_CONFIG
        cfg.config_file = path
        override = bool(cli.get("allow_insecure")) or _bool(
            environ.get("VGPU_LAUNCH_ALLOW_INSECURE", ""), "VGPU_LAUNCH_ALLOW_INSECURE"
        )
        layers.append((f"file {path}", read_file(path, allow_insecure=override)))

    from_env: dict[str, Any] = {}
    for key, (_, var) in KEYS.items():
        if var in environ:
            from_env[key] = _from_text(key, environ[var], var)
    unknown = sorted(
        v
        for v in environ
        if v.startswith("VGPU_LAUNCH_")
        and v not in {var for _, var in KEYS.values()}
        and v not in NON_OPTION_VARS
    )
    if unknown:
        raise ConfigError(f"unknown environment variable {unknown[0]} (see vgpu-launch --help)")
    layers.append(("environment", from_env))
    layers.append(("command line", dict(cli)))

    for source, values in layers:
        for key, value in values.items():
            where = source if source != "environment" else KEYS[key][1]
            value = _check(key, value, where)
            if KEYS[key][0] == "assignments":
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


def merge_cli_lists(pairs: Sequence[str] | None, where: str) -> dict[str, str] | None:
    if pairs is None:
        return None
    return dict(_assignment(p, where) for p in pairs)
