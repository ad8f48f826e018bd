"""The interpreter check of bin/vgpu-launch: what counts as missing, and the one line that says
which command installs it (the package managers are looked up, not run)."""

from __future__ import annotations

from pathlib import Path

from vgpu_launch import bootstrap
from vgpu_launch.bootstrap import DEPENDENCIES, missing_dependencies, problem

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PATH = ["/usr/lib/python311.zip", "/usr/lib/python3.11", "/usr/lib/python3/dist-packages"]
FEDORA_PATH = ["/usr/lib64/python3.12", "/usr/lib64/python3.12/site-packages",
               "/usr/lib/python3.12/site-packages"]
VENV_PATH = ["/usr/lib/python3.11", "/srv/venv/lib/python3.11/site-packages"]


def has(*tools: str) -> object:
    return lambda name: f"/usr/bin/{name}" if name in tools else None


def test_the_wrapper_runs_the_bootstrap_code() -> None:
    """bin/vgpu-launch and a hand-over to the next interpreter run the same code."""
    assert bootstrap.BOOT in (REPO / "bin" / "vgpu-launch").read_text()


def test_missing_modules_name_each_package_once() -> None:
    """python-prctl is two modules (prctl and its C part _prctl): named once."""
    found = {"ptrace"}
    missing = missing_dependencies((3, 11), lambda m: m if m in found else None)
    assert [d.pypi for d in missing] == ["python-prctl", "structlog"]
    assert missing_dependencies((3, 11), lambda m: m) == []


def test_tomli_is_needed_before_python_3_11() -> None:
    """Python 3.10 reads TOML with tomli; 3.11 has tomllib."""
    assert [d.module for d in missing_dependencies((3, 10), lambda m: None
                                                   if m == "tomli" else m)] == ["tomli"]
    assert missing_dependencies((3, 11), lambda m: None if m == "tomli" else m) == []


def test_debians_python3_is_told_to_use_apt_get() -> None:
    """The system python3 of Debian, whose dist-packages apt-get fills."""
    line = problem("/usr/bin/python3", False, (3, 11), [DEPENDENCIES[0], DEPENDENCIES[3]],
                   DEBIAN_PATH, has("apt-get"))
    assert line == ('vgpu-launch: /usr/bin/python3 lacks python-ptrace and structlog: install '
                    'them with "apt-get install python3-ptrace python3-structlog", or set '
                    "VGPU_LAUNCH_PYTHON to a python3 that has them")


def test_fedoras_python3_is_told_to_use_dnf() -> None:
    line = problem("/usr/bin/python3", False, (3, 12), [DEPENDENCIES[1]], FEDORA_PATH,
                   has("dnf"))
    assert 'install it with "dnf install python3-prctl"' in line


def test_a_venv_is_told_to_use_its_own_pip() -> None:
    """apt-get cannot help an interpreter that does not see Debian's dist-packages."""
    line = problem("/srv/venv/bin/python", True, (3, 11), list(DEPENDENCIES), VENV_PATH,
                   has("apt-get"))
    assert line == (
        "vgpu-launch: VGPU_LAUNCH_PYTHON=/srv/venv/bin/python lacks python-ptrace, python-prctl "
        'and structlog: install them with "/srv/venv/bin/python -m pip install python-ptrace '
        "python-prctl structlog\" (python-prctl needs libcap's headers to build: libcap-dev), "
        "or unset VGPU_LAUNCH_PYTHON")


def test_too_old_a_python_is_named() -> None:
    line = problem("/usr/bin/python3", False, (3, 9), [], DEBIAN_PATH, has("apt-get"))
    assert line.startswith("vgpu-launch: /usr/bin/python3 is Python 3.9; vgpu-launch needs "
                           "Python 3.10 or later: ")


def test_every_message_is_one_line() -> None:
    for version in ((3, 9), (3, 11)):
        for path in (DEBIAN_PATH, FEDORA_PATH, VENV_PATH):
            line = problem("/x/python3", True, version, list(DEPENDENCIES), path, has())
            assert "\n" not in line


def test_status_finds_the_arguments_of_a_launcher_process() -> None:
    """`vgpu-launch status` reads a launcher's own arguments from its command line, which the
    wrapper and a hand-over both give as python -E -c BOOT CHECKOUT PYTHONS ARGS..."""
    from vgpu_launch.diagnostics.status import launcher_args

    argv = ["/usr/bin/python3", "-E", "-c", bootstrap.BOOT, "/src/bin/..", "/usr/bin/python3\n",
            "--preload", "/opt/libvgpu.so", "--", "ollama", "serve"]
    assert launcher_args(argv) == ["--preload", "/opt/libvgpu.so", "--", "ollama", "serve"]
