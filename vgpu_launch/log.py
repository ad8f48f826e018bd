"""Structured logging: the decision log.

JSON lines (one event a line) or a console rendering on stderr, optionally JSON lines appended
to a file as well. Nothing is ever written to stdout: it belongs to CMD.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from typing import IO, Any

import structlog

from .errors import ConfigError

LEVELS = ("debug", "info", "warning", "error")


def _json(event_dict: MutableMapping[str, Any]) -> str:
    return json.dumps(event_dict, default=str, separators=(",", ":"), ensure_ascii=False)


class _Sink:
    """structlog logger: one rendered line to stderr, one JSON line to the log file."""

    def __init__(self, stderr: IO[str], file: IO[str] | None) -> None:
        self._stderr = stderr
        self._file = file
        self._lock = threading.Lock()

    def msg(self, stderr: str, file: str | None = None) -> None:
        with self._lock:
            try:
                self._stderr.write(stderr + "\n")
                self._stderr.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not stop the tracer
            if self._file is not None and file is not None:
                try:
                    self._file.write(file + "\n")
                    self._file.flush()
                except OSError:
                    pass

    debug = info = warning = error = critical = log = msg


class _Render:
    def __init__(self, console: bool, to_file: bool) -> None:
        self._to_file = to_file
        self._console: Any = None
        if console:
            self._console = structlog.dev.ConsoleRenderer(
                colors=False, pad_event=12, sort_keys=False
            )

    def __call__(
        self, logger: Any, name: str, event_dict: MutableMapping[str, Any]
    ) -> dict[str, Any]:
        as_json = _json(event_dict) if (self._to_file or self._console is None) else None
        if self._console is not None:
            return {"stderr": self._console(logger, name, dict(event_dict)), "file": as_json}
        return {"stderr": as_json, "file": as_json}


def _add_level(
    logger: Any, name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["level"] = "warning" if name == "warn" else name
    return event_dict


def configure(fmt: str | None, level: str, file: str | None) -> None:
    """``fmt`` None: console on a terminal, JSON lines otherwise."""
    console = (fmt == "console") if fmt else sys.stderr.isatty()
    fh: IO[str] | None = None
    if file:
        # O_NOFOLLOW: a root-run launcher must not be redirected by a planted symlink.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(file, flags, 0o640)
        except OSError as exc:
            why = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise ConfigError(f"log file {file}: {why}") from None
        fh = os.fdopen(fd, "a", encoding="utf-8")
    structlog.configure(
        processors=[
            _add_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _Render(console, fh is not None),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=lambda *args: _Sink(sys.stderr, fh),
        cache_logger_on_first_use=True,
    )


def get() -> Any:
    return structlog.get_logger()
