"""The one ELF reader, on programs and libraries gcc built here, and on broken files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vgpu_launch import arch, elf


def _interp(path: Path) -> str | None:
    with open(path, "rb") as f:
        header = elf.parse_header(f.read(elf.HEADER_SIZE))
        assert header is not None
        assert elf.has_interp(f, header) == (elf.interp(f, header) is not None)
        return elf.interp(f, header)


def test_class_machine_and_type(programs: Any) -> None:
    """A 64-bit and a 32-bit shared library: word size, machine and ET_DYN as readelf says."""
    native = arch.current()
    lib64 = elf.elf_info(programs.libmarker64)
    lib32 = elf.elf_info(programs.libmarker32)
    assert lib64 is not None and lib32 is not None
    assert (lib64.word, lib64.machine, lib64.type) == (8, native.native.elf_machine, elf.ET_DYN)
    assert (lib32.word, lib32.machine, lib32.type) == (4, native.compat.elf_machine, elf.ET_DYN)
    assert lib64.phnum > 0 and lib32.phnum > 0  # whole headers: the program headers can be walked
    assert lib32 is not None and lib32.machine_name == native.compat.name


def test_dynamic_loader_of_programs(programs: Any) -> None:
    """Dynamic programs name their ABI's loader in PT_INTERP; static ones and libraries none."""
    native = arch.current()
    assert _interp(programs.probe) == native.native.loader
    assert _interp(programs.probe32) == native.compat.loader
    assert _interp(programs.probe_static) is None
    assert _interp(programs.libmarker) is None


def test_position_independent_executables_are_told_from_libraries(programs: Any) -> None:
    """A PIE is ET_DYN like a library, but DT_FLAGS_1 says PIE: ld.so would refuse it."""
    assert elf.elf_info(programs.probe) is not None
    assert elf.is_pie_executable(programs.probe)
    assert not elf.is_pie_executable(programs.libmarker)
    assert not elf.is_pie_executable(programs.libmarker32)
    assert not elf.is_pie_executable(programs.probe_static)


@pytest.mark.parametrize("cut", [0, 3, 19, 20, 40, 64, 200])
def test_truncated_or_foreign_files(programs: Any, tmp_path: Path, cut: int) -> None:
    """A file cut anywhere in its headers is read without an exception: no ELF, no program
    headers to find, or (cut after PT_INTERP's entry) a loader whose name is cut off."""
    part = tmp_path / "part"
    part.write_bytes(Path(programs.probe).read_bytes()[:cut])
    info = elf.elf_info(str(part))
    assert (info is None) == (cut < 20)
    assert not elf.is_pie_executable(str(part))
    with open(part, "rb") as f:
        header = elf.parse_header(f.read(elf.HEADER_SIZE))
        if header is None or cut <= 64:
            assert header is None or not elf.has_interp(f, header)
        else:
            assert elf.has_interp(f, header) and elf.interp(f, header) == ""


def test_not_an_elf_file(tmp_path: Path) -> None:
    """A script is no ELF file: elf_info says None, is_pie_executable False."""
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n" * 10)
    assert elf.elf_info(str(script)) is None
    assert not elf.is_pie_executable(str(script))
    with pytest.raises(FileNotFoundError):
        elf.elf_info(str(tmp_path / "missing"))


def test_big_endian_header_fields() -> None:
    """Byte order comes from e_ident: a big-endian aarch64 header reads as machine 183."""
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x02"
    head[16:20] = elf.ET_DYN.to_bytes(2, "big") + (183).to_bytes(2, "big")
    head[32:40] = (64).to_bytes(8, "big")
    head[54:58] = (56).to_bytes(2, "big") + (9).to_bytes(2, "big")
    header = elf.parse_header(bytes(head))
    assert header == elf.Header(8, 183, elf.ET_DYN, True, 64, 56, 9)
    assert header.machine_name == "aarch64"
