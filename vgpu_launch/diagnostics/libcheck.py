"""Checks on preload libraries, done before CMD starts: the file is there, is an ELF shared
object for this machine, and for which word sizes a ``$LIB``/``$PLATFORM`` path resolves."""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from dataclasses import dataclass

from .. import arch, elf, security
from ..errors import ConfigError
from ..trace import preload


@functools.cache
def token_values(word: int) -> tuple[str, str] | None:
    """($LIB, $PLATFORM) as this host's ld.so expands them for ``word``-byte programs, or None
    where no loader of that word size is installed."""
    abi = arch.native_abi(word)
    if abi is None or not os.path.exists(abi.loader):
        return None
    loader, lib, plat = abi.loader, abi.lib, abi.platform
    try:
        out = subprocess.run(
            [loader, "--list-diagnostics"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return lib, plat
    found = dict(re.findall(r'^(dl_dst_lib|dl_platform)="([^"]*)"', out, re.M))
    return found.get("dl_dst_lib", lib), found.get("dl_platform", plat)


@dataclass(frozen=True)
class PreloadCheck:
    path: str
    files: dict[int, str]  # word size -> file that ld.so would load
    unusable: dict[int, str]  # word size -> why programs of that size cannot load it


def check(path: str, source: str = "", *, allow_insecure: bool = False) -> PreloadCheck:
    """Raise ConfigError for a library no native program could load, or one that someone
    other than root or this user could change (security.py; ``allow_insecure`` accepts it);
    report the rest."""
    machine = platform.machine()
    if not path:
        raise ConfigError("an empty preload path was given")
    if not path.startswith("/") and not preload.has_tokens(path.split("/")[0]):
        raise ConfigError(
            f"preload library {path!r}: use an absolute path (a relative one would be looked "
            "up from every program's own working directory)"
        )
    files: dict[int, str] = {}
    unusable: dict[int, str] = {}
    for word in (8, 4):
        values = token_values(word) if preload.has_tokens(path) else ("", "")
        if values is None:
            unusable[word] = f"no {word * 8}-bit dynamic loader on this host"
            continue
        expanded = preload.expand(path, lib=values[0], platform=values[1])
        if expanded is None:  # $ORIGIN: differs per program, checked per program by ld.so
            files[word] = path
            continue
        problem = _problem(expanded, word, machine)
        if problem:
            unusable[word] = problem if expanded == path else f"{expanded} {problem}"
        else:
            files[word] = expanded
    if 8 in unusable:
        where = f" (from {source})" if source else ""
        raise ConfigError(f"preload library {path}: {unusable[8]}{where}")
    for file in dict.fromkeys(files.values()):
        if file == path and preload.expand(path, lib="", platform="") is None:
            if not allow_insecure:
                where = f" (from {source})" if source else ""
                raise ConfigError(
                    f"refusing preload library {path}{where}: $ORIGIN makes it a different "
                    "file for every program, which cannot be checked for who can change it; "
                    f"give an absolute path, or accept the risk with {security.OVERRIDE}"
                )
            continue
        security.check(file, "preload library", allow_insecure=allow_insecure, source=source)
    return PreloadCheck(path, files, unusable)


def _problem(path: str, word: int, machine: str) -> str | None:
    try:
        if os.path.isdir(path):
            return "is a directory, not a shared library"
        info = elf.elf_info(path)
    except FileNotFoundError:
        return "not found"
    except PermissionError:
        return "is not readable"
    except OSError as exc:
        return str(exc.strerror)
    if info is None:
        return "is not an ELF file"
    if info.type != elf.ET_DYN:
        return f"is not a shared object (ELF type {info.type})"
    if elf.is_pie_executable(path):
        return "is a program (position-independent executable), not a shared library"
    abi = arch.native_abi(word)
    if abi is None or info.word != word or info.machine != abi.elf_machine:
        return (
            f"is a {info.word * 8}-bit {info.machine_name} library; "
            f"{word * 8}-bit programs on this {machine} host cannot load it"
        )
    return None
