"""examples/ollama-like/demo.sh, the README's first command: it shows the before/after whichever
python3 comes first in PATH, the commands it shows are the ones it runs, and a failure of
vgpu-launch is not passed off as ollama's output."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from support import REPO

DEMO = REPO / "examples" / "ollama-like" / "demo.sh"
CACHE = Path(os.environ.get("VGPU_TEST_CACHE", REPO / ".cache" / "tests"))

FOREIGN = '#!/bin/sh\nexec /usr/bin/python3 -S "$@"\n'  # runs, but without the libraries
BROKEN = '#!/bin/sh\necho "this python3 must not be used" >&2\nexit 3\n'


def demo(tmp_path: Path, python3: str | None, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run the demo with ``python3`` (a script's text) first in PATH; None: Debian's."""
    first = tmp_path / "first-in-path"
    first.mkdir()
    if python3 is None:
        (first / "python3").symlink_to("/usr/bin/python3")
    else:
        (first / "python3").write_text(python3)
        (first / "python3").chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VGPU_LAUNCH_", "VGPU_TEST_")) and k != "LD_PRELOAD"
    }
    env["PATH"] = f"{first}:{env.get('PATH', '/usr/bin:/bin')}"
    env["VGPU_DEMO_CACHE"] = str(CACHE / "demo")
    env.update(extra)
    return subprocess.run(
        [str(DEMO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def result_row(stdout: str, which: str) -> str:
    m = re.search(rf"^    \({which}\) .*?(\S+)$", stdout, re.M)
    assert m, stdout
    return m[1]


@pytest.fixture(scope="module")
def foreign_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    return demo(tmp_path_factory.mktemp("demo"), FOREIGN)


def test_demo_with_a_python3_lacking_the_libraries_first_in_path(
    foreign_run: subprocess.CompletedProcess[str],
) -> None:
    """A pyenv/conda/venv python3 first in PATH: the demo exits 0 with 0 GPUs before, 1 after."""
    r = foreign_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert result_row(r.stdout, "a") == "0"
    assert result_row(r.stdout, "b") == "1"
    assert "injected" in r.stdout and "ModuleNotFoundError" not in r.stdout + r.stderr


def test_demo_with_a_broken_python3_first_in_path(tmp_path: Path) -> None:
    """Even a python3 that cannot run at all, first in PATH, is not used."""
    r = demo(tmp_path, BROKEN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert result_row(r.stdout, "b") == "1"
    assert "must not be used" not in r.stdout + r.stderr


def test_the_commands_shown_are_the_commands_run(
    foreign_run: subprocess.CompletedProcess[str],
) -> None:
    """Each "$ ..." line, pasted into a shell at the top of the checkout, does what the demo
    showed: 0 devices without vgpu-launch, 1 under it (with its JSON decision log)."""
    shown = [line[2:] for line in foreign_run.stdout.splitlines() if line.startswith("$ ")]
    assert len(shown) == 2, foreign_run.stdout
    assert shown[1].startswith("bin/vgpu-launch --log-format json "), shown[1]
    for line, count in zip(shown, ("0", "1"), strict=True):
        r = subprocess.run(
            shlex.split(line),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"initial_count={count}" in r.stderr.splitlines(), r.stderr[-3000:]
    assert '"event":"exec"' in r.stderr.replace(" ", "")


def test_a_launcher_failure_is_not_shown_as_ollamas_output(tmp_path: Path) -> None:
    """When vgpu-launch refuses to start (here: a misspelt VGPU_LAUNCH_ variable), its message
    is shown as its own, and the demo fails saying so."""
    r = demo(tmp_path, None, VGPU_LAUNCH_BOGUS="1")
    assert r.returncode == 1
    section = r.stdout.split("(b) with vgpu-launch", 1)[1].split("====", 2)[1]
    assert "ollama's own output" not in section, section
    assert re.search(
        r"vgpu-launch did not start ollama.*\n.*unknown environment variable "
        r"VGPU_LAUNCH_BOGUS",
        section,
    ), section
    assert "before it started ollama" in r.stderr
