"""The decision log: one structured event per decision, never in the tracer's way.

``log.get()`` gives the logger: ``.debug/.info/.warning/.error(event, **fields)``. A call only
clips over-long fields and appends the event to a bounded queue per sink (writer.py); a writer
thread per sink renders and writes it. So the tracer never waits for a reader: a stalled one
(stderr on a full pipe, slow storage behind --log-file, journald under pressure) costs log
lines, counted in ``log-dropped`` events, never a process of the tree. Nothing raised while
logging reaches the caller.

Sinks: stderr (JSON lines, the console rendering on a terminal, or journald's native protocol
when stderr is the journal) and the --log-file (JSON lines). Nothing is ever written to
stdout: it belongs to CMD.

Start-up: ``configure`` imports neither json nor structlog and starts no thread; events queue
until ``release()`` (called once CMD runs) starts the writers, which then import what they
render with. ``shutdown()`` writes what is queued, waiting at most FLUSH_SECONDS.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import threading
import time
from typing import Any

from ..errors import ConfigError
from .clip import clip_fields
from .writer import Writer

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# At exit, how long the writers may take to write what is queued (the end event among it)
# before vgpu-launch exits anyway: a reader that never reads must not hold the exit.
FLUSH_SECONDS = 2.0


class Logger:
    """The producers' side. Cheap, never blocks on output, never raises. Fields are rendered
    later, in a writer thread: pass values that are not changed afterwards."""

    def __init__(self, writers: list[Writer]) -> None:
        self.writers = writers
        self._min = min((w.level for w in writers), default=100)
        self._summary = any(w.summary for w in writers)
        self.errors = 0
        # The tracer and the verifier log at once: without it, two sinks could get their
        # events in different orders. Held only for the queue appends, which never block.
        self._order = threading.Lock()

    def _emit(self, level: int, name: str, event: str, fields: dict[str, Any]) -> None:
        end = event == "end"
        if level < self._min and not (end and self._summary):
            return
        try:
            if clip_fields(fields):
                fields["truncated"] = True
            with self._order:
                item = (time.time(), name, event, fields)
                for w in self.writers:
                    if level >= w.level or (end and w.summary):
                        w.put(item, always=end)
        except Exception:  # logging must never disturb the caller (the tracer)
            self.errors += 1

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(10, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(20, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(30, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(40, "error", event, fields)


_logger: Logger | None = None
_lock = threading.Lock()


def _open_log_file(path: str) -> int:
    # O_NOFOLLOW: a root-run launcher must not be redirected by a planted symlink.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o640)
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise ConfigError(f"log file {path}: {why}") from None


def configure(fmt: str | None, level: str, file: str | None, *, level_set: bool = True) -> None:
    """Set the sinks up (cheaply: no import of a renderer, no thread yet).

    ``fmt`` None: console on a terminal, JSON lines otherwise; when stderr is the journal
    (JOURNAL_STREAM), JSON lines through journald's native protocol. On a terminal with no
    format asked for and ``level_set`` false (no level from any source), stderr is quiet:
    warnings and errors only, and one summary line at the end if something ran without the
    preload.
    """
    global _logger
    from .sinks import FdSink, JournalSink, journal_stream

    threshold = LEVELS.get(level, LEVELS["info"])
    tty = os.isatty(2)
    console = fmt == "console" or (fmt is None and tty)
    quiet = fmt is None and tty and not level_set
    writers: list[Writer] = []
    stderr = FdSink(2, console=console, summary=quiet)
    sink: Any = stderr
    if not console and journal_stream(os.environ):
        # no native socket (a container?): JSON lines on the stream
        with contextlib.suppress(OSError):
            sink = JournalSink(stderr)
    name = "journal" if sink is not stderr else "stderr"
    writers.append(Writer(name, sink, LEVELS["warning"] if quiet else threshold, summary=quiet))
    if file:
        writers.append(Writer("file", FdSink(_open_log_file(file)), threshold))
    with _lock:
        old, _logger = _logger, Logger(writers)
    if old is None:
        atexit.register(shutdown)
    else:
        _flush(old, FLUSH_SECONDS)


def get() -> Logger:
    """The logger (JSON lines or console on stderr, level info, if not configured)."""
    if _logger is None:
        configure(None, "info", None)
    assert _logger is not None
    return _logger


def release() -> None:
    """Start the writer threads: CMD runs, rendering may take the interpreter now."""
    logger = _logger
    if logger is not None:
        for w in logger.writers:
            w.start()


def shutdown(timeout: float = FLUSH_SECONDS) -> bool:
    """Write everything queued, waiting at most ``timeout`` seconds in all; True if done."""
    logger = _logger
    return logger is None or _flush(logger, timeout)


def _flush(logger: Logger, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    done = True
    for w in logger.writers:
        done = w.flush(deadline - time.monotonic()) and done
    return done
