"""The interpreter check of bin/vgpu-launch: what it looks for, and that the wrapper and a
hand-over run the same code."""

from __future__ import annotations

from pathlib import Path

from vgpu_launch import bootstrap, deps

REPO = Path(__file__).resolve().parents[2]


def test_the_wrapper_runs_the_bootstrap_code() -> None:
    """bin/vgpu-launch and a hand-over to the next interpreter run the same code."""
    assert bootstrap.BOOT in (REPO / "bin" / "vgpu-launch").read_text()


def test_what_an_interpreter_needs() -> None:
    """deps.py's modules, prctl's C part (a venv of another Python version sees prctl.py
    without it), and tomli before Python 3.11."""
    assert bootstrap.modules((3, 11)) == [*(d.module for d in deps.DEPENDENCIES), "_prctl"]
    assert bootstrap.modules((3, 10))[-1] == "tomli"
    assert bootstrap.lacks((3, 9))


def test_too_old_a_python_is_one_line() -> None:
    """A Python older than 3.10 gets one line naming it and what is needed."""
    line = bootstrap.too_old("/usr/bin/python3", False, (3, 9))
    assert "\n" not in line
    assert line.startswith(
        "vgpu-launch: /usr/bin/python3 is Python 3.9; vgpu-launch needs Python 3.10 or later: "
    )
    assert bootstrap.too_old("/x", True, (3, 8)).startswith("vgpu-launch: VGPU_LAUNCH_PYTHON=/x ")


def test_status_finds_the_arguments_of_a_launcher_process() -> None:
    """`vgpu-launch status` reads a launcher's own arguments from its command line, which the
    wrapper and a hand-over both give as python -E -c BOOT CHECKOUT PYTHONS ARGS..."""
    from vgpu_launch.launchers import launcher_args

    argv = [
        "/usr/bin/python3",
        "-E",
        "-c",
        bootstrap.BOOT,
        "/src/bin/..",
        "/usr/bin/python3\n",
        "--preload",
        "/opt/libvgpu.so",
        "--",
        "ollama",
        "serve",
    ]
    assert launcher_args(argv) == ["--preload", "/opt/libvgpu.so", "--", "ollama", "serve"]
