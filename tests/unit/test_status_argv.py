"""How ``vgpu-launch status`` tells a vgpu-launch process from others by its command line
(bin/vgpu-launch, ``python -m vgpu_launch``, the packaged entry point), and finds its arguments."""

from __future__ import annotations

from vgpu_launch.launchers import launcher_args


def test_launcher_recognised() -> None:
    """vgpu-launch's own command lines are recognised, with its arguments; others are not."""

    code = "import sys\ndel sys.argv[1]\nfrom vgpu_launch.cli import main\nmain()\n"
    cases = {
        ("/usr/bin/vgpu-launch", "--preload", "/x.so", "--", "a"): [
            "--preload",
            "/x.so",
            "--",
            "a",
        ],
        ("python3", "/usr/bin/vgpu-launch", "--", "a"): ["--", "a"],
        ("/usr/bin/python3", "-m", "vgpu_launch", "--", "a"): ["--", "a"],
        ("python3.11", "-E", "-c", code, "", "--preload", "/x.so", "--", "a"): [
            "--preload",
            "/x.so",
            "--",
            "a",
        ],
        ("python3", "-E", "-c", code, "/src/bin/..", "--", "a"): ["--", "a"],
    }
    for argv, args in cases.items():
        assert launcher_args(argv) == args, argv
    for argv in (
        ("python3", "-m", "vgpu_launch", "status", "1"),
        ("python3", "-E", "-c", code, "", "doctor"),
        ("python3", "-m", "pytest"),
        ("python3", "-c", "print(1)"),
        ("/usr/bin/sleep", "vgpu-launch"),
        (),
    ):
        assert launcher_args(argv) is None, argv
