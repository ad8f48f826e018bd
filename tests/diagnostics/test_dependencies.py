"""A Python without python-ptrace, python-prctl or structlog: ``--version`` says which is
missing, and every command answers with one line naming the packages and the commands that
install them, never a traceback.

The Pythons are virtual environments made from this interpreter without its site packages;
"partial" gets python-ptrace and python-prctl back (links to this interpreter's copies) and
lacks only structlog.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import REPO, launch

import vgpu_launch

DEPENDENCIES = {"ptrace": "python-ptrace", "prctl": "python-prctl", "structlog": "structlog"}
DEBIAN = {"ptrace": "python3-ptrace", "prctl": "python3-prctl", "structlog": "python3-structlog"}


def _venv(path: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv):\n{proc.stderr}",
            pytrace=False,
        )
    return path / "bin" / "python"


def _can_import(python: Path, module: str) -> bool:
    proc = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False)
    return proc.returncode == 0


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    python = _venv(tmp_path_factory.mktemp("bare") / "venv")
    for module in DEPENDENCIES:
        assert not _can_import(python, module), f"{python} still imports {module}"
    return python


@pytest.fixture(scope="module")
def partial_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("partial") / "venv"
    python = _venv(root)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for module in ("ptrace", "prctl", "_prctl"):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{module} is not importable here"
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (Path(site) / source.name).symlink_to(source)
    assert _can_import(python, "ptrace") and _can_import(python, "prctl")
    assert not _can_import(python, "structlog")
    return python


Runner = Callable[..., tuple[int, str, str]]


@pytest.fixture
def vgpu(empty_config: str) -> Runner:
    """``vgpu(python, *args)``: bin/vgpu-launch ARGS (no --log-format added) run by ``python``,
    with no configuration of this host; (exit status, stdout, stderr)."""

    def run(python: Path | str, *args: str) -> tuple[int, str, str]:
        result = launch.run(
            args,
            log_format=None,
            timeout=60,
            env={"VGPU_LAUNCH_PYTHON": str(python), "VGPU_LAUNCH_CONFIG": empty_config},
        )
        return result.returncode, result.stdout, result.stderr

    return run


def test_version_names_every_version_and_where_it_runs_from(vgpu: Runner) -> None:
    """--version: one line naming vgpu-launch's, Python's and each dependency's version."""
    rc, out, err = vgpu(sys.executable, "--version")
    assert rc == 0 and err == "", err
    assert out.count("\n") == 1, out
    line = out.strip()
    here = REPO / "vgpu_launch"
    assert line.startswith(f"vgpu-launch {vgpu_launch.__version__} from {here} "), line
    assert f"Python {platform.python_version()} {sys.executable}" in line, line
    for pip_name in DEPENDENCIES.values():
        assert f"{pip_name} {importlib.metadata.version(pip_name)}" in line, line


def test_version_with_a_missing_dependency_says_which(partial_python: Path, vgpu: Runner) -> None:
    """Without structlog, --version exits 125 with one line naming it and how to install it."""
    rc, out, err = vgpu(partial_python, "--version")
    assert rc == 125, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"vgpu-launch {vgpu_launch.__version__} from "), line
    assert "structlog missing" in line and str(partial_python) in line, line
    assert "'apt-get install python3-structlog'" in line, line
    assert f"'{partial_python} -m pip install structlog'" in line, line
    assert "ptrace" not in line and "prctl" not in line, line


@pytest.mark.parametrize("command", [["doctor"], ["doctor", "--unit", "ollama"]])
def test_doctor_without_dependencies_is_one_line(
    bare_python: Path, command: list[str], vgpu: Runner
) -> None:
    """doctor without the dependencies: exit 125, one line naming the Debian and pip packages."""
    rc, out, err = vgpu(bare_python, *command, "--preload", "/opt/vgpu/libvgpu.so")
    assert rc == 125, (out, err)
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("vgpu-launch doctor: "), err
    assert f"apt-get install {' '.join(DEBIAN.values())}" in err, err
    assert f"-m pip install {' '.join(DEPENDENCIES.values())}" in err, err


def test_run_without_dependencies_is_one_line(
    bare_python: Path, tmp_path: Path, vgpu: Runner
) -> None:
    """Running CMD with a dependency missing: one line, exit status 125, CMD never started."""
    marker = tmp_path / "ran"
    rc, out, err = vgpu(
        bare_python, "--preload", "/opt/vgpu/libvgpu.so", "--", "touch", str(marker)
    )
    assert rc == 125, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("vgpu-launch: Python modules "), err
    assert "ptrace, prctl, structlog missing" in err, err
    assert not marker.exists()


@pytest.fixture
def sleeper() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_status_needs_none_of_them(bare_python: Path, sleeper: int, vgpu: Runner) -> None:
    """status reads /proc only: without the dependencies it still reports on a process."""
    rc, out, err = vgpu(bare_python, "status", "--preload", "/opt/vgpu/libvgpu.so", str(sleeper))
    assert "Traceback" not in err, err
    assert rc == 1, (out, err)  # the library is not mapped in sleep: reported, not crashed
    assert f"{sleeper} " in out and "status: NOT every process has the preload" in out, out
