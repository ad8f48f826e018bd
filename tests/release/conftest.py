"""Giving processes back: ``vgpu-launch release PID`` to the operator's debuggers (gdb -p,
strace -p, py-spy dump), the tree's own ptrace requests handed over through the seccomp
listener (strace or gdb as CMD, LeakSanitizer), and ``release_after_exec``.

The programs are tests/programs/rel_*.c and librelmarker.c (fixture ``programs``,
../conftest.py).  A running tree whose processes the tests release is a
``support.launch.ShellTree``: CMD is a shell that runs the lines the test sends it.

Fixtures, on top of ../conftest.py:

``tree`` (per test)
    ``vgpu-launch --preload librelmarker.so -- sh``, running, as a ``ShellTree``.
``gdb``, ``strace``, ``py_spy`` (session)
    The debugger's path; a test that needs one that is missing fails, saying how to install it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator

import pytest
from support.build import Programs
from support.launch import ShellTree


@pytest.fixture
def tree(programs: Programs) -> Iterator[ShellTree]:
    with ShellTree(["--preload", programs.librelmarker]) as t:
        yield t


def _tool(name: str, package: str) -> str:
    # py-spy comes from pip: it may sit next to the interpreter, off PATH
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.fail(
            f"{name} is needed: install it ({package}; scripts/setup.sh does)", pytrace=False
        )
    return path


@pytest.fixture(scope="session")
def gdb() -> str:
    return _tool("gdb", "Debian: gdb")


@pytest.fixture(scope="session")
def strace() -> str:
    return _tool("strace", "Debian: strace")


@pytest.fixture(scope="session")
def py_spy() -> str:
    return _tool("py-spy", "pip install py-spy")
