"""Checks on preload libraries, done before CMD starts: the file is there, is an ELF shared
object for this machine, and for which word sizes a ``$LIB``/``$PLATFORM`` path resolves."""

from __future__ import annotations

import functools
import os
import platform
import re
import struct
import subprocess
from dataclasses import dataclass
from typing import Literal

from .. import security
from ..errors import ConfigError
from ..trace import preload

ET_DYN = 3
_MACHINES = {3: "i386", 62: "x86_64", 40: "arm", 183: "aarch64"}
# (machine, word size) -> (dynamic loader, $LIB and $PLATFORM if it cannot tell us)
_LOADERS = {
    ("x86_64", 8): ("/lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu", "x86_64"),
    ("x86_64", 4): ("/lib/ld-linux.so.2", "lib/i386-linux-gnu", "i686"),
    ("aarch64", 8): ("/lib/ld-linux-aarch64.so.1", "lib/aarch64-linux-gnu", "aarch64"),
    ("aarch64", 4): ("/lib/ld-linux-armhf.so.3", "lib/arm-linux-gnueabihf", "v7l"),
}
_NATIVE_MACHINE = {"x86_64": 62, "aarch64": 183}
_COMPAT_MACHINE = {"x86_64": 3, "aarch64": 40}


@dataclass(frozen=True)
class ElfInfo:
    word: int
    machine: int
    type: int

    @property
    def machine_name(self) -> str:
        return _MACHINES.get(self.machine, f"machine {self.machine}")


PT_DYNAMIC = 2
DT_NULL = 0
DT_FLAGS_1 = 0x6FFFFFFB
DF_1_PIE = 0x08000000


def is_pie_executable(path: str) -> bool:
    """Whether ``path`` is a position-independent executable (DT_FLAGS_1 has DF_1_PIE): an
    ET_DYN file like a library, which ld.so refuses to preload."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return False
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        phoff, phentsize, phnum = (
            struct.unpack_from(end + "Q", data, 32)[0],
            *struct.unpack_from(end + "HH", data, 54),
        )
    else:
        phoff, phentsize, phnum = (
            struct.unpack_from(end + "I", data, 28)[0],
            *struct.unpack_from(end + "HH", data, 42),
        )
    for i in range(phnum):
        ph = phoff + i * phentsize
        if ph + phentsize > len(data):
            return False
        if struct.unpack_from(end + "I", data, ph)[0] != PT_DYNAMIC:
            continue
        if is64:
            offset, size = (
                struct.unpack_from(end + "Q", data, ph + 8)[0],
                struct.unpack_from(end + "Q", data, ph + 32)[0],
            )
            fmt, step = end + "qQ", 16
        else:
            offset, size = (
                struct.unpack_from(end + "I", data, ph + 4)[0],
                struct.unpack_from(end + "I", data, ph + 16)[0],
            )
            fmt, step = end + "iI", 8
        for pos in range(offset, min(offset + size, len(data) - step + 1), step):
            tag, value = struct.unpack_from(fmt, data, pos)
            if tag == DT_NULL:
                break
            if tag == DT_FLAGS_1:
                return bool(value & DF_1_PIE)
    return False


def elf_info(path: str) -> ElfInfo | None:
    """ELF class, machine and type of ``path``; None if it is not an ELF file."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] not in (1, 2):
        return None
    order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
    return ElfInfo(
        4 if head[4] == 1 else 8,
        int.from_bytes(head[18:20], order),
        int.from_bytes(head[16:18], order),
    )


@functools.cache
def token_values(word: int) -> tuple[str, str] | None:
    """($LIB, $PLATFORM) as this host's ld.so expands them for ``word``-byte programs, or None
    where no loader of that word size is installed."""
    machine = platform.machine()
    entry = _LOADERS.get((machine, word))
    if entry is None or not os.path.exists(entry[0]):
        return None
    loader, lib, plat = entry
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
        info = elf_info(path)
    except FileNotFoundError:
        return "not found"
    except PermissionError:
        return "is not readable"
    except OSError as exc:
        return str(exc.strerror)
    if info is None:
        return "is not an ELF file"
    if info.type != ET_DYN:
        return f"is not a shared object (ELF type {info.type})"
    if is_pie_executable(path):
        return "is a program (position-independent executable), not a shared library"
    want = _NATIVE_MACHINE.get(machine) if word == 8 else _COMPAT_MACHINE.get(machine)
    if info.word != word or info.machine != want:
        return (
            f"is a {info.word * 8}-bit {info.machine_name} library; "
            f"{word * 8}-bit programs on this {machine} host cannot load it"
        )
    return None
