"""Recognising vgpu-launch processes from outside: by their command line, and as the tracer
of a process (for `status`, `release`, and every message that names a process's tracer)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import procfs

_MODULES = ("vgpu_launch", "vgpu_launch.cli", "vgpu_launch.__main__")


def launcher_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after the program name if ``argv`` is a vgpu-launch process, else None.

    Recognised: ``vgpu-launch ARGS``, ``python3 [OPTS] /usr/bin/vgpu-launch ARGS``,
    ``python3 [OPTS] -m vgpu_launch ARGS``, and ``python3 [OPTS] -c CODE [SLOT...] ARGS`` where
    CODE imports vgpu_launch (bin/vgpu-launch; each ``del sys.argv[1]`` in CODE drops a slot).
    ``doctor``, ``status`` and ``release`` processes are not launchers."""
    if not argv:
        return None
    args: list[str] | None = None
    if os.path.basename(argv[0]) == "vgpu-launch":
        args = list(argv[1:])
    elif os.path.basename(argv[0]).startswith("python"):
        i = 1
        while i < len(argv):
            arg = argv[i]
            if arg in ("-m", "-c") or (arg[:2] in ("-m", "-c") and len(arg) > 2):
                value = argv[i + 1] if len(arg) == 2 and i + 1 < len(argv) else arg[2:]
                rest = i + (2 if len(arg) == 2 else 1)
                if arg.startswith("-m") and value in _MODULES:
                    args = list(argv[rest:])
                elif arg.startswith("-c") and "vgpu_launch" in value:
                    args = list(argv[rest + value.count("del sys.argv[1]") :])
                break
            if arg in ("-X", "-W", "--check-hash-based-pycs"):
                i += 2
                continue
            if arg.startswith("-"):
                i += 1
                continue
            if os.path.basename(arg) == "vgpu-launch":
                args = list(argv[i + 1 :])
            break
    if args is None or (args and args[0] in ("doctor", "status", "release")):
        return None
    return args


def traced_by_hint(tracer: int | str) -> str:
    """For messages that say a process is traced by thread ``tracer``: if that thread belongs
    to a vgpu-launch, how to get the process back (empty otherwise)."""
    owner = procfs.tgid_of(int(tracer)) if str(tracer).isdigit() else None
    argv = procfs.cmdline(owner) if owner else None
    if owner is None or argv is None or launcher_args(argv) is None:
        return ""
    return (
        f" (thread {tracer} of vgpu-launch {owner}: `vgpu-launch release PID` gives a process back)"
    )


def untraced_note(pid: int, launchers: set[int]) -> str | None:
    """For ``vgpu-launch status``: what a process below a vgpu-launch that no vgpu-launch
    traces is (None: traced by one of ``launchers``)."""
    tid = procfs.tracer_of(pid)
    if tid:
        owner = procfs.tgid_of(tid)
        if owner in launchers:
            return None
        return (
            f"released: traced by pid {owner} ({procfs.comm(owner or tid)}), not by "
            "vgpu-launch; programs it starts are not followed"
        )
    return "released: not traced by vgpu-launch; programs it starts are not followed"
