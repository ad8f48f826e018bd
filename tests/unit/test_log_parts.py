"""The decision log's parts, in-process: escaping, the line cap, the bounded queue, journald."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vgpu_launch import log
from vgpu_launch.log import clip, render, sinks
from vgpu_launch.log.writer import Item, Writer

CONTROL = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)]))


@pytest.fixture
def fresh_log() -> Iterator[None]:
    """The module's logger as it was, after the test."""
    saved = log._logger
    yield
    if log._logger is not None and log._logger is not saved:
        log.shutdown(2.0)
    log._logger = saved


def _json(fields: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    return render.json_line(render.event_dict(0.0, "info", "exec", fields))


def _console(fields: dict[str, Any]) -> str:
    return render.console_renderer()(render.event_dict(0.0, "info", "exec", fields)).decode()


# -- escaping ---------------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_read_the_same_in_json_and_console() -> None:
    """A path with bytes 0xff 0xfe shows them as \\xff\\xfe in a JSON line and on the console."""
    exe = os.fsdecode(b"/tmp/\xff\xfe/prog")
    line, _ = _json({"exe": exe, "argv": [exe]})
    assert json.loads(line)["exe"] == "/tmp/\\xff\\xfe/prog"
    assert json.loads(line)["argv"] == ["/tmp/\\xff\\xfe/prog"]
    console = _console({"exe": exe, "argv": [exe]})
    assert "exe=/tmp/\\xff\\xfe/prog" in console
    # a list is shown as JSON (newer structlog versions quote it once more, with repr())
    assert re.search(r'argv=\'?\["/tmp/\\{1,2}xff\\{1,2}xfe/prog"\]', console), console
    assert console.rstrip("\n").isprintable()


def test_json_keeps_control_characters_exactly_but_never_raw() -> None:
    """Control characters (C0, DEL, C1) are JSON escapes: exact content, no raw control byte."""
    line, _ = _json({"exe": f"/x{CONTROL}y"})
    text = line.decode()
    assert not any(c in CONTROL for c in text.rstrip("\n"))
    assert json.loads(line)["exe"] == f"/x{CONTROL}y"


def test_json_escapes_del_in_an_otherwise_ascii_line() -> None:
    """DEL is ASCII but a control character: a line with no other one still escapes it."""
    line, _ = _json({"argv": ["a=\x7f"]})
    assert b"\x7f" not in line and b"\\u007f" in line
    assert json.loads(line)["argv"] == ["a=\x7f"]


def test_the_console_shows_control_characters_as_escapes() -> None:
    """An escape sequence in a program's name cannot reach the terminal raw."""
    console = _console({"exe": "/tmp/\x1b]0;owned\x07\x1b[31mred\x9b2J", "argv": ["\x1b[2J"]})
    assert not any(c in CONTROL for c in console.rstrip("\n"))
    assert "exe=/tmp/\\x1b]0;owned\\x07\\x1b[31mred\\u009b2J" in console


# -- size -------------------------------------------------------------------------------------


def test_clip_marks_long_strings_and_lists() -> None:
    """Long argv entries and long lists are clipped with a visible marker."""
    fields: dict[str, Any] = {"argv": ["a" * 5000, "b"], "cmd": ["x"] * 100, "pid": 3}
    assert clip.clip_fields(fields)
    assert fields["argv"][0] == "a" * clip.STR_MAX + f"…({5000 - clip.STR_MAX} more characters)"
    assert len(fields["cmd"]) == clip.LIST_MAX + 1
    assert fields["cmd"][-1] == f"…({100 - clip.LIST_MAX} more)"
    assert not clip.clip_fields({"argv": ["short"], "pid": 1})


@pytest.mark.parametrize("kind", ["json", "console"])
def test_no_line_exceeds_the_cap(kind: str) -> None:
    """Whatever the fields, one event is one line of at most LINE_MAX bytes."""
    nasty = os.fsdecode(b"\xff" * 1000)
    fields: dict[str, Any] = {
        "argv": [nasty] * 64,
        "cmd": [nasty] * 64,
        "sources": {f"k{i}": nasty for i in range(200)},
        "exe": nasty,
        "pid": 7,
    }
    for _ in range(2):
        ev = render.event_dict(0.0, "warning", "exec", fields)
        line = render.json_line(ev)[0] if kind == "json" else render.console_renderer()(ev)
        assert len(line) <= clip.LINE_MAX
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        if kind == "json":
            shown = json.loads(line)
            assert shown["truncated"] is True and shown["event"] == "exec" and shown["pid"] == 7
        fields = {"pid": 7, **{f"f{i}": nasty for i in range(300)}}  # then: too many fields


# -- the queue and the writer -----------------------------------------------------------------


class _Sink:
    def __init__(self, gate: threading.Event | None = None, fail_on: str = "") -> None:
        self.items: list[Item] = []
        self.gate = gate
        self.fail_on = fail_on

    def write(self, item: Item) -> None:
        if self.gate is not None:
            self.gate.wait()
        if item[2] == self.fail_on:
            raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
        self.items.append(item)


def test_a_full_queue_drops_counts_and_reports_the_loss() -> None:
    """Past the queue's capacity events are dropped; a log-dropped event with the count follows."""
    sink = _Sink()
    w = Writer("stderr", sink, 20, capacity=4)
    for i in range(10):
        w.put((0.0, "info", "exec", {"n": i}))
    w.put((0.0, "info", "end", {}), always=True)  # the end event is queued even then
    assert w.flush(10.0)
    names = [(it[2], it[3].get("n", it[3].get("dropped"))) for it in sink.items]
    assert names == [
        ("exec", 0),
        ("exec", 1),
        ("exec", 2),
        ("exec", 3),
        ("log-dropped", 6),
        ("end", None),
    ]
    assert sink.items[-1][3]["log_dropped"] == 6 and w.dropped_total == 6


def test_the_loss_is_reported_as_soon_as_the_writer_catches_up() -> None:
    """A loss is reported when the writer has emptied its queue, without waiting for a new event."""
    gate = threading.Event()
    sink = _Sink(gate)
    w = Writer("file", sink, 20, capacity=2)
    w.start()
    for i in range(6):
        w.put((0.0, "info", "exec", {"n": i}))
    gate.set()
    assert w.flush(10.0)
    assert sink.items[-1][2] == "log-dropped"
    assert sum(it[3]["dropped"] for it in sink.items if it[2] == "log-dropped") == w.dropped_total
    assert len(sink.items) - 1 + w.dropped_total == 6


def test_an_exception_in_a_sink_is_counted_and_writing_goes_on() -> None:
    """A sink that raises (any exception) costs that line only; the end event counts it."""
    sink = _Sink(fail_on="bad")
    w = Writer("file", sink, 20)
    w.start()
    w.put((0.0, "info", "bad", {}))
    w.put((0.0, "info", "exec", {}))
    w.put((0.0, "info", "end", {}), always=True)
    assert w.flush(10.0)
    assert [it[2] for it in sink.items] == ["exec", "end"]
    assert sink.items[-1][3]["log_errors"] == 1


def test_a_logger_never_raises_and_never_writes_in_the_callers_thread(
    fresh_log: None, tmp_path: Path
) -> None:
    """A field that cannot be rendered costs its event only, counted, in the writer's thread."""

    class Evil:
        def __str__(self) -> str:
            raise RuntimeError("no")

    path = tmp_path / "log.jsonl"
    log.configure("json", "info", str(path))
    logger = log.get()
    logger.info("exec", evil=Evil())
    logger.info("exec", exe=os.fsdecode(b"/\xff"))
    assert path.read_bytes() == b""  # nothing written before the writers are released
    log.release()
    logger.info("end")
    assert log.shutdown(10.0)
    lines = [json.loads(raw) for raw in path.read_bytes().splitlines()]
    assert [e["event"] for e in lines] == ["exec", "end"]
    assert lines[0]["exe"] == "/\\xff" and lines[1]["log_errors"] == 1


# -- the quiet terminal -----------------------------------------------------------------------


def test_the_summary_names_what_ran_without_the_preload() -> None:
    """Nothing to say when every program got it; else one line with the counts."""
    counts = {"injected": 5, "merged": 0, "present": 2, "excluded": 1, "setuid": 0, "failed": 0}
    assert render.summary({"counts": counts, "verification": {"unverified": 0}}) is None
    counts |= {"setuid": 1, "failed": 2}
    text = render.summary({"counts": counts, "verification": {"unverified": 1}})
    assert text == (
        "vgpu-launch: 3 programs without the preload (2 failed, 1 setuid); "
        "1 injection not verified; -v shows each decision\n"
    )


# -- journald ---------------------------------------------------------------------------------


def parse_native(data: bytes) -> dict[str, bytes]:
    """journald's native protocol, read back (both the simple and the binary field form)."""
    fields: dict[str, bytes] = {}
    while data:
        nl = data.index(b"\n")
        head = data[:nl]
        if b"=" in head:
            name, _, value = head.partition(b"=")
            data = data[nl + 1 :]
        else:
            name = head
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            data = data[nl + 10 + size :]
        fields[name.decode()] = value
    return fields


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A fake journald socket, and stderr (fd 2) named by JOURNAL_STREAM as systemd does."""
    path = tmp_path / "journal.socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(10)
    monkeypatch.setattr(sinks, "JOURNAL_SOCKET", str(path))
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    yield server
    server.close()


def test_events_go_to_journald_with_native_fields(fresh_log: None, journal: socket.socket) -> None:
    """With stderr on the journal, each event is a datagram: MESSAGE is the JSON line, every
    field a VGPU_LAUNCH_* field, priority from the level."""
    log.configure(None, "info", None)
    log.get().warning(
        "exec",
        pid=42,
        exe=os.fsdecode(b"/x/\xff"),
        decision="failed",
        argv=["a", "b\nc"],
        static=False,
        reason="two\nlines",
    )
    log.release()
    assert log.shutdown(10.0)
    fields = parse_native(journal.recv(65536))
    assert json.loads(fields["MESSAGE"])["exe"] == "/x/\\xff"
    assert fields["PRIORITY"] == b"4"
    assert fields["SYSLOG_IDENTIFIER"] == b"vgpu-launch"
    assert fields["VGPU_LAUNCH_EVENT"] == b"exec"
    assert fields["VGPU_LAUNCH_DECISION"] == b"failed"
    assert fields["VGPU_LAUNCH_PID"] == b"42"
    assert fields["VGPU_LAUNCH_EXE"] == b"/x/\\xff"
    assert fields["VGPU_LAUNCH_STATIC"] == b"false"
    assert json.loads(fields["VGPU_LAUNCH_ARGV"]) == ["a", "b\nc"]
    assert fields["VGPU_LAUNCH_REASON"] == b"two\nlines"


def test_without_a_journald_socket_the_stream_gets_json_lines(
    fresh_log: None, journal: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM set but no socket to reach (a container): JSON lines on stderr."""
    monkeypatch.setattr(sinks, "JOURNAL_SOCKET", str(tmp_path / "absent"))
    log.configure(None, "info", None)
    assert isinstance(log.get().writers[0].sink, sinks.FdSink)


def test_a_journald_restart_loses_no_line(
    capfd: pytest.CaptureFixture[str], fresh_log: None, journal: socket.socket, tmp_path: Path
) -> None:
    """If journald's socket goes away, the line is sent to the new one, or else to the stream."""
    log.configure(None, "info", None)
    log.release()
    journal.close()
    os.unlink(sinks.JOURNAL_SOCKET)  # journald gone, nothing in its place yet
    log.get().info("exec", pid=1)
    assert log.shutdown(10.0)
    assert json.loads(capfd.readouterr().err)["pid"] == 1
    again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # journald is back
    again.bind(sinks.JOURNAL_SOCKET)
    again.settimeout(10)
    log.get().info("exec", pid=2)
    assert log.shutdown(10.0)
    assert json.loads(parse_native(again.recv(65536))["MESSAGE"])["pid"] == 2
    again.close()


def test_journal_stream_must_name_stderr_itself(tmp_path: Path) -> None:
    """An inherited JOURNAL_STREAM that does not match fd 2's device and inode is ignored."""
    st = os.fstat(2)
    assert sinks.journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not sinks.journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not sinks.journal_stream({"JOURNAL_STREAM": "garbage"})
    assert not sinks.journal_stream({})


def test_a_loss_report_that_is_itself_refused_keeps_the_count() -> None:
    """If journald also refuses the log-dropped event, its count goes into the next one."""
    from vgpu_launch.log.writer import Dropped

    class Refusing(_Sink):
        refuse = 2  # the event, then the first log-dropped event

        def write(self, item: Item) -> None:
            if self.refuse:
                self.refuse -= 1
                raise Dropped()
            self.items.append(item)

    sink = Refusing()
    w = Writer("journal", sink, 20)
    w.put((0.0, "info", "exec", {"n": 1}))
    assert w.flush(10.0)
    deadline = time.monotonic() + 10
    while not sink.items and time.monotonic() < deadline:  # the second log-dropped event
        time.sleep(0.01)
    w.put((0.0, "info", "end", {}), always=True)
    assert w.flush(10.0)
    assert [(it[2], it[3].get("dropped")) for it in sink.items] == [
        ("log-dropped", 1),
        ("end", None),
    ]
    assert sink.items[-1][3]["log_dropped"] == 1
