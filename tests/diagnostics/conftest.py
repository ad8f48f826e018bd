"""Diagnostics: ``vgpu-launch doctor``, ``vgpu-launch status`` and the load verifier, against
good and broken set-ups; ``--version``, and the one line every command answers with when
Python lacks a dependency.  A unit under a real systemd is tests/system's; here ``--unit`` reads a
stand-in systemctl (support/systemctl.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def empty_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty configuration file: VGPU_LAUNCH_CONFIG points at it, so that no configuration
    of this host leaks into the checks."""
    conf: Path = tmp_path_factory.mktemp("conf") / "empty.conf"
    conf.write_text("")
    return str(conf)
