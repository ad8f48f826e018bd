"""Finding CMD as execvp(3) and the shell do, with their exit codes for what cannot be run
(vgpu_launch/command.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgpu_launch import command
from vgpu_launch.errors import LaunchError


def test_resolve(tmp_path: Path) -> None:
    """A command is found on PATH; not found is 127, not executable 126, empty 2."""
    exe = tmp_path / "bin" / "prog"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    plain = tmp_path / "bin" / "plain"
    plain.write_text("")
    plain.chmod(0o644)
    assert command.resolve("prog", f"/nonexistent:{exe.parent}") == str(exe)
    assert command.resolve(str(exe), None) == str(exe)
    with pytest.raises(LaunchError) as e:
        command.resolve("no-such-prog-xyz", str(exe.parent))
    assert e.value.code == 127 and "no-such-prog-xyz" in str(e.value)
    with pytest.raises(LaunchError) as e:
        command.resolve(str(tmp_path), None)
    assert e.value.code == 126
    with pytest.raises(LaunchError) as e:
        command.resolve("plain", str(exe.parent))
    assert e.value.code == 126 and "plain" in str(e.value)
    with pytest.raises(LaunchError) as e:
        command.resolve("", None)
    assert e.value.code == 2
