"""One event, one line: escaping, JSON and console rendering, journal fields. Runs in the
writer threads only.

Escaping, the same in every sink: a byte that is not UTF-8 (Python holds it as a lone
surrogate, U+DC80-U+DCFF) becomes the four characters ``\\xNN``; in JSON, control characters
are JSON escapes (DEL and C1 included, so that no raw control byte reaches a terminal); on the
console they become ``\\xNN`` (C0, DEL) or ``\\u00NN`` (C1).
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from .clip import LINE_MAX, SCALARS, deep_clip

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}  # syslog levels for journald
# Tried in turn while a rendered line is over LINE_MAX: (string, list) limits.
_SHRINK = ((256, 16), (64, 4))
_MINIMAL_STR = 64

# -- escaping -------------------------------------------------------------------------------

_JSON_FIX = re.compile("[\x7f-\x9f\ud800-\udfff]")
_CONSOLE_FIX = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate(c: int) -> str:
    # U+DC80..U+DCFF: a byte that was not UTF-8 (surrogateescape); another lone surrogate
    # cannot come from a path or argv, but must not break the line either.
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"


def _json_fix(m: re.Match[str]) -> str:
    c = ord(m.group())
    if c >= 0xD800:
        return "\\" + _surrogate(c)  # inside a JSON string: an escaped backslash, then xNN
    return f"\\u{c:04x}"  # DEL, C1: the JSON escape of the same character


def _console_fix(m: re.Match[str]) -> str:
    c = ord(m.group())
    if c >= 0xD800:
        return _surrogate(c)
    return f"\\x{c:02x}" if c < 0x80 else f"\\u{c:04x}"


def text(s: str) -> str:
    """``s`` with non-UTF-8 bytes as ``\\xNN`` (control characters kept)."""
    if s.isascii():
        return s
    return _SURROGATE.sub(lambda m: _surrogate(ord(m.group())), s)


def _dumps(value: Any) -> str:
    line = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    # DEL is ASCII: an ASCII line needs the fix only when it holds one.
    return line if line.isascii() and "\x7f" not in line else _JSON_FIX.sub(_json_fix, line)


# -- whole events ---------------------------------------------------------------------------


def iso(t: float) -> str:
    """structlog's ISO UTC time stamp, without structlog."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def event_dict(t: float, level: str, event: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    return {"event": event, "level": level, "ts": iso(t), **fields}


def _fit(
    ev: dict[str, Any], render: Callable[[dict[str, Any]], bytes]
) -> tuple[bytes, dict[str, Any]]:
    """Render ``ev``, clipping harder until the line fits in LINE_MAX."""
    line = render(ev)
    if len(line) <= LINE_MAX:
        return line, ev
    head = {k: ev[k] for k in ("event", "level", "ts")}
    body = {k: v for k, v in ev.items() if k not in head}
    tries = [{k: deep_clip(v, smax, lmax) for k, v in body.items()} for smax, lmax in _SHRINK]
    # Then scalars only, short; then numbers and booleans; then only what the event is.
    tries.append(
        {k: deep_clip(v, _MINIMAL_STR, 0) for k, v in body.items() if isinstance(v, SCALARS)}
    )
    tries.append({k: v for k, v in body.items() if isinstance(v, (int, float, bool))})
    tries.append({})
    for fields in tries:
        small = {**head, **fields, "truncated": True}
        line = render(small)
        if len(line) <= LINE_MAX:
            break
    return line, small


def json_line(ev: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The JSON line (newline included) and the event it shows (clipped if it had to be)."""
    return _fit(ev, lambda e: (_dumps(e) + "\n").encode("utf-8", "backslashreplace"))


def _console_text(value: Any) -> Any:
    if isinstance(value, str):
        return _CONSOLE_FIX.sub(_console_fix, value)
    if isinstance(value, SCALARS):
        return value
    # lists and tables as JSON, escaped for the terminal like a string
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return _CONSOLE_FIX.sub(_console_fix, text)


def console_renderer() -> Callable[[dict[str, Any]], bytes]:
    """structlog's console rendering (structlog imported here: in a writer thread, once)."""
    import structlog

    options: dict[str, Any] = {"colors": False, "sort_keys": False, "pad_event_to": 12}
    try:
        renderer = structlog.dev.ConsoleRenderer(**options)
    except TypeError:  # structlog before 25.1 calls it pad_event
        options["pad_event"] = options.pop("pad_event_to")
        renderer = structlog.dev.ConsoleRenderer(**options)

    def render(ev: dict[str, Any]) -> bytes:
        # Every value escaped before structlog sees it (it quotes what it finds unprintable,
        # in its own way); the line once more after, in case it added anything raw.
        d: dict[str, Any] = {k: _console_text(v) for k, v in ev.items() if k != "ts"}
        d["timestamp"] = ev["ts"]
        line = _CONSOLE_FIX.sub(_console_fix, str(renderer(None, ev["level"], d)))
        return (line + "\n").encode("utf-8", "backslashreplace")

    return lambda ev: _fit(ev, render)[0]


def summary(fields: Mapping[str, Any]) -> str | None:
    """The one line a quiet terminal gets at the end: what ran without the preload."""
    counts = fields.get("counts") or {}
    verification = fields.get("verification") or {}
    parts = [f"{counts[d]} {d}" for d in ("failed", "setuid") if counts.get(d)]
    unverified = verification.get("unverified", 0)
    if not parts and not unverified:
        return None
    said = []
    if parts:
        n = sum(counts[d] for d in ("failed", "setuid") if counts.get(d))
        said.append(f"{n} program{'s' if n > 1 else ''} without the preload ({', '.join(parts)})")
    if unverified:
        said.append(f"{unverified} injection{'s' if unverified > 1 else ''} not verified")
    return f"vgpu-launch: {'; '.join(said)}; -v shows each decision\n"


# -- journald -------------------------------------------------------------------------------

_FIELD_NAME = re.compile(r"[^A-Z0-9_]")


def journal_datagram(line: bytes, ev: Mapping[str, Any]) -> bytes:
    """The native-protocol datagram for one event: MESSAGE is the JSON line, and every
    top-level field is also a journal field VGPU_LAUNCH_<NAME> (lists and tables as JSON)."""
    out = [
        _field("MESSAGE", line.rstrip(b"\n")),
        _field("PRIORITY", str(_PRIORITY.get(ev["level"], 6)).encode()),
        _field("SYSLOG_IDENTIFIER", b"vgpu-launch"),
    ]
    for key, value in ev.items():
        if key in ("level", "ts"):
            continue
        name = "VGPU_LAUNCH_" + _FIELD_NAME.sub("_", key.upper())
        if isinstance(value, str):
            data = text(value)
        elif isinstance(value, bool):
            data = "true" if value else "false"
        elif value is None:
            data = ""
        elif isinstance(value, (int, float)):
            data = str(value)
        else:
            data = _dumps(value)
        out.append(_field(name[:64], data.encode("utf-8", "backslashreplace")))
    return b"".join(out)


def _field(name: str, value: bytes) -> bytes:
    if b"\n" in value:  # the binary form: name, newline, 64-bit little-endian size, data
        return name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
    return name.encode() + b"=" + value + b"\n"
