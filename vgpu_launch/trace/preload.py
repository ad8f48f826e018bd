"""LD_PRELOAD values: splitting, merging, and ld.so's dynamic string tokens.

Pure functions on bytes: environment strings are bytes in the kernel and may not be UTF-8.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# ld.so (glibc and musl) splits LD_PRELOAD on colons and spaces.
_SEPARATORS = re.compile(rb"[: ]+")
_TOKEN = re.compile(r"\$(?:\{(LIB|PLATFORM|ORIGIN)\}|(LIB|PLATFORM|ORIGIN)\b)")


def split(value: bytes | None) -> list[bytes]:
    """The entries of an LD_PRELOAD value, empty entries dropped."""
    if not value:
        return []
    return [entry for entry in _SEPARATORS.split(value) if entry]


def contains_all(configured: Iterable[bytes], value: bytes | None) -> bool:
    """Whether every configured library is already an entry of ``value``."""
    present = set(split(value))
    return all(lib in present for lib in configured)


def merge(configured: Sequence[bytes], existing: Iterable[bytes | None]) -> bytes:
    """One LD_PRELOAD value: the configured libraries first, then the entries the program
    already had, each once, colon-separated.

    ``existing`` holds every LD_PRELOAD value found (a malformed environment can carry several);
    their entries are kept in order. Tokens such as ``$LIB`` are left for ld.so to expand.
    """
    seen: set[bytes] = set()
    out: list[bytes] = []
    for entry in [*configured, *(e for value in existing for e in split(value))]:
        if entry not in seen:
            seen.add(entry)
            out.append(entry)
    return b":".join(out)


def has_tokens(path: str) -> bool:
    return _TOKEN.search(path) is not None


def expand(path: str, *, lib: str, platform: str, origin: str | None = None) -> str | None:
    """Expand ``$LIB``, ``$PLATFORM`` and ``$ORIGIN`` (or ``${...}``) as ld.so would for one
    process. Returns None where ``$ORIGIN`` is used but unknown (it depends on the program)."""
    values = {"LIB": lib, "PLATFORM": platform, "ORIGIN": origin}
    if origin is None and "ORIGIN" in {m.group(1) or m.group(2) for m in _TOKEN.finditer(path)}:
        return None
    return _TOKEN.sub(lambda m: values[m.group(1) or m.group(2)] or "", path)
