"""The one reader of ELF file headers and program headers.

vgpu-launch asks three things of an ELF file: its class, type and machine (is a preload library
loadable by programs of a word size; elf_info), whether a program has a PT_INTERP header (it is
dynamically linked, so ld.so runs in it), and whether an ET_DYN file is a position-independent
executable (DT_FLAGS_1 has DF_1_PIE: ld.so refuses to preload a program). Both byte orders and
both classes are read; nothing is mapped or executed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from . import arch

MAGIC = b"\x7fELF"
ET_DYN = 3
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_FLAGS_1 = 0x6FFFFFFB
DF_1_PIE = 0x08000000

HEADER_SIZE = 64  # the 64-bit header; the 32-bit one (52 bytes) fits in it
_MAX_PHNUM = 256  # far more than any linker writes: a bound for a corrupt file
_IDENT = 20  # e_ident, e_type and e_machine: the least parse_header can tell a file by


@dataclass(frozen=True)
class Header:
    word: int  # 4 (ELFCLASS32) or 8 (ELFCLASS64)
    machine: int  # e_machine
    type: int  # e_type (ET_DYN: a shared object or a position-independent executable)
    big_endian: bool = False
    phoff: int = 0
    phentsize: int = 0
    phnum: int = 0

    @property
    def machine_name(self) -> str:
        return arch.machine_name(self.machine)

    @property
    def _end(self) -> str:
        return ">" if self.big_endian else "<"


def parse_header(data: bytes) -> Header | None:
    """The header at the start of ``data``; None if it is not an ELF file. The program header
    table's place is filled in only when ``data`` holds the whole header."""
    if len(data) < _IDENT or data[:4] != MAGIC or data[4] not in (1, 2):
        return None
    word = 4 if data[4] == 1 else 8
    end = ">" if data[5] == 2 else "<"
    typ, machine = struct.unpack_from(end + "HH", data, 16)
    if len(data) < (52 if word == 4 else HEADER_SIZE):
        return Header(word, machine, typ, end == ">")
    if word == 8:
        (phoff,) = struct.unpack_from(end + "Q", data, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 54)
    else:
        (phoff,) = struct.unpack_from(end + "I", data, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 42)
    return Header(word, machine, typ, end == ">", phoff, phentsize, phnum)


def elf_info(path: str) -> Header | None:
    """The header of ``path`` (whole, so that its program headers can be walked); None if it
    is not an ELF file. Raises OSError."""
    with open(path, "rb") as f:
        return parse_header(f.read(HEADER_SIZE))


def program_headers(f: BinaryIO, header: Header) -> Iterator[tuple[int, bytes]]:
    """(p_type, the whole entry) of each program header of the open file ``f``."""
    if header.phentsize < 8 or not header.phnum:
        return
    f.seek(header.phoff)
    table = f.read(header.phentsize * min(header.phnum, _MAX_PHNUM))
    for pos in range(0, len(table) - header.phentsize + 1, header.phentsize):
        entry = table[pos : pos + header.phentsize]
        yield struct.unpack_from(header._end + "I", entry)[0], entry


def interp(f: BinaryIO, header: Header) -> str | None:
    """The PT_INTERP path of the open ELF file ``f`` (the dynamic loader the kernel starts for
    it); None for a static program or a library."""
    for kind, entry in program_headers(f, header):
        if kind != PT_INTERP:
            continue
        if header.word == 8 and len(entry) >= 40:
            (offset,) = struct.unpack_from(header._end + "Q", entry, 8)
            (size,) = struct.unpack_from(header._end + "Q", entry, 32)
        elif header.word == 4 and len(entry) >= 20:
            (offset,) = struct.unpack_from(header._end + "I", entry, 4)
            (size,) = struct.unpack_from(header._end + "I", entry, 16)
        else:
            return ""
        f.seek(offset)
        return f.read(min(size, 4096)).split(b"\0", 1)[0].decode(errors="replace")
    return None


def has_interp(f: BinaryIO, header: Header) -> bool:
    """Whether the open ELF file ``f`` has a PT_INTERP program header (a dynamically linked
    program: the kernel starts its ld.so)."""
    return any(kind == PT_INTERP for kind, _ in program_headers(f, header))


def is_pie_executable(path: str) -> bool:
    """Whether ``path`` is a position-independent executable (DT_FLAGS_1 has DF_1_PIE): an
    ET_DYN file like a library, which ld.so refuses to preload. Raises OSError."""
    with open(path, "rb") as f:
        header = parse_header(f.read(HEADER_SIZE))
        if header is None or not header.phnum:
            return False
        end = header._end
        for kind, entry in program_headers(f, header):
            if kind != PT_DYNAMIC or len(entry) < (40 if header.word == 8 else 20):
                continue
            if header.word == 8:
                (offset,) = struct.unpack_from(end + "Q", entry, 8)
                (size,) = struct.unpack_from(end + "Q", entry, 32)
                fmt, step = end + "qQ", 16
            else:
                (offset,) = struct.unpack_from(end + "I", entry, 4)
                (size,) = struct.unpack_from(end + "I", entry, 16)
                fmt, step = end + "iI", 8
            f.seek(offset)
            dynamic = f.read(min(size, 1 << 20))
            for pos in range(0, len(dynamic) - step + 1, step):
                tag, value = struct.unpack_from(fmt, dynamic, pos)
                if tag == DT_NULL:
                    break
                if tag == DT_FLAGS_1:
                    return bool(value & DF_1_PIE)
        return False
