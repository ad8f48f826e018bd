"""The programs the preload must reach: those named with ``--check PROGRAM`` and the CMD of a
unit's ExecStart. Their word size decides whether a library without a 32-bit build is a
warning (a 32-bit program was found) or only a note."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from ...options import split_command
from .. import libcheck, verify
from ..effective import launcher_argv
from ..systemd import Unit
from .result import FAIL, NOTE, OK, WARN, Checks

# systemd's PATH for a unit that sets none (systemd.exec(5), "Environment variables")
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
_SCRIPT_LEVELS = 4  # the kernel's limit of nested #! interpreters (BINPRM_MAX_RECURSION)


@dataclass(frozen=True)
class Program:
    name: str  # as given
    path: str  # where it was found
    source: str  # "--check" or "ExecStart of UNIT"
    word: int  # 4 or 8: the word size of the program that runs (a script's interpreter)
    static: bool
    via: str = ""  # a script's interpreter

    def describe(self) -> str:
        return f"{self.path} ({self.source})"


def _elf(path: str) -> tuple[int, bool] | None:
    """(word size, statically linked) of an ELF program, or None if it is not one."""
    info = libcheck.elf_info(path)
    if info is None:
        return None
    with open(path, "rb") as f:
        head = f.read(64)
        return info.word, not verify._has_interp(f, head, info.word)


def _interpreter(path: str, search: str) -> str | None:
    """The program a ``#!`` script runs (through ``/usr/bin/env NAME`` too), or None."""
    with open(path, "rb") as f:
        line = f.readline(256)
    if not line.startswith(b"#!"):
        return None
    words = line[2:].decode(errors="replace").split()
    if not words:
        return None
    if os.path.basename(words[0]) == "env" and len(words) > 1:
        rest = [w for w in words[1:] if not w.startswith("-")]
        return shutil.which(rest[0], path=search) if rest else None
    return words[0]


def _find(name: str, search: str) -> str | None:
    if "/" in name:
        return name if os.path.exists(name) else None
    return shutil.which(name, path=search)


def inspect(checks: Checks, name: str, source: str, search: str) -> Program | None:
    """One line about the program; the Program if it is one the preload can be checked for."""
    what = f"program {name}"
    path = _find(name, search)
    if path is None:
        where = "" if "/" in name else f" on PATH ({search})"
        checks.add(FAIL, what, f"not found{where} ({source})", "give the program's full path")
        return None
    try:
        found = _elf(path)
        via = ""
        # a script's interpreter may be a script itself (a pyenv shim): the kernel follows a
        # few levels, so do the same
        for _level in range(_SCRIPT_LEVELS):
            if found is not None:
                break
            interp = _interpreter(via or path, search)
            if interp is None:
                checks.add(WARN, what, f"{via or path} is neither an ELF program nor a #! script")
                return None
            via, found = interp, _elf(interp)
        if found is None:
            checks.add(WARN, what, f"{path}: no ELF program after {_SCRIPT_LEVELS} #! levels")
            return None
    except OSError as exc:
        checks.add(WARN, what, f"cannot read {path}: {exc.strerror}")
        return None
    word, static = found
    program = Program(name, path, source, word, static, via)
    kind = f"a script run by {via}, " if via else ""
    bits = f"{kind}{word * 8}-bit"
    if static:
        checks.add(
            NOTE,
            what,
            f"{path}: {bits}, statically linked: it cannot load a preload library (the programs "
            f"it starts still get it) ({source})",
        )
    else:
        checks.add(OK, what, f"{path}: {bits}, dynamically linked ({source})")
    return program


def unit_commands(unit: Unit) -> list[str]:
    """The CMD of each ExecStart that runs vgpu-launch, else the ExecStart's own program."""
    found = []
    for argv in unit.exec_start:
        args = launcher_argv(argv)
        command = split_command(args)[1] if args is not None else argv
        if command:
            found.append(command[0])
    return found


def check_programs(checks: Checks, requested: list[str], unit: Unit | None) -> list[Program]:
    todo = [(name, "--check", os.environ.get("PATH") or SYSTEMD_PATH) for name in requested]
    if unit is not None:
        search = unit.environment.get("PATH") or SYSTEMD_PATH
        todo += [(name, f"ExecStart of {unit.name}", search) for name in unit_commands(unit)]
    programs = []
    for name, source, search in dict.fromkeys(todo):
        program = inspect(checks, name, source, search)
        if program is not None:
            programs.append(program)
    return programs
