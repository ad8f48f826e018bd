"""Size limits of an event. ``clip`` runs in the threads that log, the tracer among them: it
only measures and slices (no import beyond this module), so that a program with a megabyte of
argv costs the queue kilobytes, not megabytes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# journald's default LineMax is 48K: a longer line is split and no longer parses.
LINE_MAX = 16 * 1024  # bytes of one line, newline included
STR_MAX = 1024  # characters of one string (a field, a list entry)
LONG_STR_MAX = {"traceback": 8192}
LIST_MAX = 64  # entries of one list (an exec event's argv has 16 at most)

SCALARS = (str, int, float, bool, type(None))


def cut(s: str, n: int) -> str:
    return f"{s[:n]}…({len(s) - n} more characters)"


def clip_fields(fields: dict[str, Any]) -> bool:
    """Clip over-long strings and lists among ``fields`` (top level, and a list's entries) in
    place; True if anything was clipped."""
    clipped = False
    for key, value in fields.items():
        kind = type(value)
        if kind is str:
            n = LONG_STR_MAX.get(key, STR_MAX)
            if len(value) > n:
                fields[key] = cut(value, n)
                clipped = True
        elif (kind is list or kind is tuple) and (
            len(value) > LIST_MAX or any(type(v) is str and len(v) > STR_MAX for v in value)
        ):
            fields[key] = _clip_list(value, STR_MAX, LIST_MAX)
            clipped = True
    return clipped


def _clip_list(value: list[Any] | tuple[Any, ...], smax: int, lmax: int) -> list[Any]:
    out = [cut(v, smax) if type(v) is str and len(v) > smax else v for v in value[:lmax]]
    if len(value) > lmax:
        out.append(f"…({len(value) - lmax} more)")
    return out


def deep_clip(value: Any, smax: int, lmax: int) -> Any:
    """A copy of ``value`` with every string, list and table clipped (the writer's second
    pass, for a line still over LINE_MAX)."""
    if isinstance(value, str):
        return cut(value, smax) if len(value) > smax else value
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {str(k): deep_clip(v, smax, lmax) for k, v in items[:lmax]}
        if len(items) > lmax:
            out["…"] = f"{len(items) - lmax} more"
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        seq = list(value)
        out_list = [deep_clip(v, smax, lmax) for v in seq[:lmax]]
        if len(seq) > lmax:
            out_list.append(f"…({len(seq) - lmax} more)")
        return out_list
    return value if isinstance(value, SCALARS) else deep_clip(str(value), smax, lmax)
