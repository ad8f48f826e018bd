"""Where lines go: a file descriptor (stderr, the --log-file), or journald's native socket.

Each sink is driven by its own writer thread (writer.py), so a sink may block: a stalled
reader then costs that sink's lines, nothing else.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable, Mapping
from typing import Any

from .writer import Dropped, Item

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# How long journald may keep refusing one datagram (its queue is full) before the event is
# dropped and counted.
JOURNAL_WAIT_MS = 1000


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            # Someone made the descriptor non-blocking (stderr is shared with CMD): wait
            # here, in the writer thread, as a blocking write would.
            select.select([], [fd], [])
            continue
        view = view[n:]


def _event(item: Item) -> dict[str, Any]:
    from . import render  # here, in a writer thread: not on the way to CMD's exec

    t, level, event, fields = item
    return render.event_dict(t, level, event, fields)


class FdSink:
    """JSON lines, or the console rendering, to a descriptor. ``summary``: a quiet terminal,
    which gets the end event as one sentence, and only if something ran without the preload."""

    def __init__(self, fd: int, *, console: bool = False, summary: bool = False) -> None:
        self.fd = fd
        self.console = console
        self.summary = summary
        self._render: Callable[[dict[str, Any]], bytes] | None = None

    def write(self, item: Item) -> None:
        self.write_line(self.line(item))

    def line(self, item: Item) -> bytes:
        from . import render

        if self.summary and item[2] == "end":
            text = render.summary(item[3])
            return text.encode() if text else b""
        ev = _event(item)
        if not self.console:
            return render.json_line(ev)[0]
        if self._render is None:
            self._render = render.console_renderer()
        return self._render(ev)

    def write_line(self, line: bytes) -> None:
        if line:
            write_all(self.fd, line)


def journal_stream(environ: Mapping[str, str], fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal (JOURNAL_STREAM names
    its device and inode: a descriptor merely inherited from a service does not match)."""
    dev, _, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return int(dev) == st.st_dev and int(ino) == st.st_ino
    except (OSError, ValueError):
        return False


class JournalSink:
    """journald's native protocol: one datagram per event, the JSON line as MESSAGE and every
    field as VGPU_LAUNCH_<NAME>. If journald cannot be reached, the JSON line goes to the
    stream (``fallback``) instead, as without the native protocol."""

    def __init__(self, fallback: FdSink, path: str | None = None) -> None:
        self.fallback = fallback
        self.path = path or JOURNAL_SOCKET
        self.sock = self._connect()

    def _connect(self) -> Any:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def write(self, item: Item) -> None:
        from . import render

        line, shown = render.json_line(_event(item))
        data = render.journal_datagram(line, shown)
        try:
            self._send(data)
        except OSError:
            # journald restarted (the socket we connected to is gone): once more, anew; if
            # it is still not there, the stream has the line.
            try:
                self.sock.close()
                self.sock = self._connect()
                self._send(data)
            except OSError:
                self.fallback.write_line(line)

    def _send(self, data: bytes) -> None:
        import socket

        poller = None
        while True:
            try:
                self.sock.send(data, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                pass
            if poller is None:
                poller = select.poll()
                poller.register(self.sock, select.POLLOUT)
            if not poller.poll(JOURNAL_WAIT_MS):
                raise Dropped(errno.EAGAIN)
