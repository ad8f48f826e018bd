"""vgpu-launch's own failures end it with the shell's codes and one line on stderr: a usage error
2, a command not found 127, a command that cannot be run 126."""

from __future__ import annotations

import os
from pathlib import Path

from support.build import Programs
from support.launch import LaunchResult, run


def _run(programs: Programs, cmd: list[str | Path], cwd: Path) -> LaunchResult:
    return run(["--preload", programs.libtest, "--", *cmd], cwd=cwd)


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if not x.startswith("{")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_usage_error_is_2(programs: Programs, tmp_path: Path) -> None:
    """An unknown option, or no command at all: exit 2 and one line saying so."""
    r = run(["--no-such-option", "--", "true"], log_format=None, cwd=tmp_path)
    assert r.returncode == 2
    assert _one_line(r.stderr).startswith("vgpu-launch: ")
    r = run(["--preload", programs.libtest], log_format=None, cwd=tmp_path)
    assert r.returncode == 2 and "no command" in _one_line(r.stderr)


def test_not_found_is_127(programs: Programs, tmp_path: Path) -> None:
    """A command not found on PATH, or a path that does not exist: exit 127, naming it."""
    r = _run(programs, ["no-such-command-xyz"], tmp_path)
    assert r.returncode == 127
    line = _one_line(r.stderr)
    assert "no-such-command-xyz" in line and "not found" in line
    r = _run(programs, [tmp_path / "missing"], tmp_path)
    assert r.returncode == 127 and str(tmp_path / "missing") in _one_line(r.stderr)
    assert r.stdout == ""


def test_not_executable_is_126(programs: Programs, tmp_path: Path) -> None:
    """A file without execute permission, or a directory: exit 126, naming it."""
    plain = tmp_path / "plain"
    plain.write_text("echo hi\n")
    plain.chmod(0o644)
    for target in (plain, tmp_path):
        r = _run(programs, [target], tmp_path)
        assert r.returncode == 126, r.stderr
        line = _one_line(r.stderr)
        assert str(target) in line, line
    if os.geteuid() != 0:  # root may read anything; a mode-000 file is still not executable
        return
    r = _run(programs, [plain], tmp_path)
    assert r.returncode == 126


def test_script_without_interpreter_line_runs_with_sh(programs: Programs, tmp_path: Path) -> None:
    """execvp(3) and the shell run an executable file the kernel refuses (ENOEXEC) with
    /bin/sh."""
    script = tmp_path / "script"
    script.write_text('echo from-script "$1"\nexit 7\n')
    script.chmod(0o755)
    r = _run(programs, [script, "arg"], tmp_path)
    assert (r.returncode, r.stdout) == (7, "from-script arg\n"), r.stderr
