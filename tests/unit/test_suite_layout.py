"""The test suite's own rules (docs/testing.md): test files live in the area folders, each test
says what it checks in a docstring, and every C program the tests run is a file of
tests/programs that support/build.py builds."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from support import REPO
from support.build import PROGRAMS

TESTS = REPO / "tests"
AREAS = {"unit", "launcher", "robustness", "diagnostics", "release", "system"}


def _test_files() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def test_test_files_live_in_the_area_folders() -> None:
    """Every test file sits in one of the area folders, none at the top of tests/."""
    misplaced = [
        str(p.relative_to(TESTS))
        for p in _test_files()
        if p.parent.parent != TESTS or p.parent.name not in AREAS
    ]
    assert misplaced == []


def test_test_file_names_are_unique() -> None:
    """pytest imports test files by their base name (no packages): no two may share one."""
    names = Counter(p.name for p in _test_files())
    assert [n for n, count in names.items() if count > 1] == []


def test_every_test_has_a_docstring() -> None:
    """Each test function starts with a docstring saying what it checks."""
    missing = []
    for path in _test_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.name.startswith("test_")
                and not ast.get_docstring(node)
            ):
                missing.append(f"{path.relative_to(TESTS)}::{node.name}")
    assert missing == []


def test_c_programs_are_files_of_tests_programs() -> None:
    """No C source in a Python string; every file of tests/programs is built."""
    include = "#" + "include <"  # spelled so that this file does not match itself
    inline = [str(p.relative_to(TESTS)) for p in TESTS.rglob("*.py") if include in p.read_text()]
    assert inline == []
    sources = {p.name for p in (TESTS / "programs").glob("*.c")}
    built = {source for _out, _cc, source, _flags in PROGRAMS.values()}
    assert sources == built
