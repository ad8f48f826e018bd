"""What every test folder shares (the harness itself is the package tests/support).

Before any test: every process the tests start begins with default signal dispositions and an
empty signal mask, however pytest was started (``nohup``, a shell's background job):
``support.procs.reset_inherited_signal_state``.

Fixtures (session-scoped unless said otherwise):

``programs``
    Every C program of tests/programs, built once (``support.build.build_programs``):
    ``programs.probe``, ``programs.rtool``, ``programs["probe-static"]``... (paths, as str).
``ollama_like``
    examples/ollama-like, built with its build.sh: ``.ollama``, ``.libcuda``, ``.shim``, ``.dir``.
``pub`` (per test)
    A fresh root-owned 0755 directory under /tmp, which ``nobody`` can enter (tmp_path cannot
    be).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, build, procs

if str(REPO) not in sys.path:  # vgpu_launch from this checkout, however pytest was started
    sys.path.insert(0, str(REPO))


def pytest_configure(config: pytest.Config) -> None:
    procs.reset_inherited_signal_state()


@pytest.fixture(scope="session")
def programs() -> build.Programs:
    return build.build_programs()


@pytest.fixture(scope="session")
def ollama_like() -> build.Programs:
    return build.build_ollama_like()


@pytest.fixture
def pub(request: pytest.FixtureRequest) -> Iterator[Path]:
    d = build.public_dir(f"vgpu-{request.module.__name__.removeprefix('test_')}-")
    yield d
    shutil.rmtree(d, ignore_errors=True)
