"""The first vgpu-launch code that ``bin/vgpu-launch`` runs: is this interpreter the right one?

``bin/vgpu-launch`` starts the first interpreter of its list that exists (``VGPU_LAUNCH_PYTHON``
alone when it is set; the distribution's python3 alone in the packages; else the checkout's
``.venv`` made by scripts/setup.sh, ``/usr/bin/python3``, then ``python3`` from PATH) and passes
the rest of the list along. Here, before the command line is looked at, that interpreter is
checked for Python 3.10 and python-ptrace, python-prctl and structlog (deps.py). If it lacks
one, the next interpreter of the list that has them all is started instead (each candidate is
asked with one short probe; when the first one is right, the check is a path lookup per
module). If none has them, this one goes on all the same: each command then says in one line
what is missing and how to install it (deps.py), and ``status``, which needs none of them,
works. Only a Python too old to run vgpu-launch at all is answered here.

This module must stay importable by Python 3.7 and later (a too old one must still get its
line), so it imports nothing of the package that needs more.
"""

from __future__ import annotations

import os
import sys

# Same code as deps.require(): vgpu-launch cannot run here.
EXIT_MISSING = 125
MIN_PYTHON = (3, 10)

BOOT = """
import sys
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]
checkout, pythons = sys.argv[1], sys.argv[2]
del sys.argv[1]
del sys.argv[1]
if checkout:
    import os.path
    sys.path.insert(0, os.path.abspath(checkout))
try:
    from vgpu_launch.bootstrap import start
except ImportError as exc:
    print("vgpu-launch: %s cannot import vgpu_launch (%s): install vgpu-launch for it, or set "
          "VGPU_LAUNCH_PYTHON to the python3 it is installed for" % (sys.executable, exc),
          file=sys.stderr)
    sys.exit(125)
start(checkout, pythons)
from vgpu_launch.cli import main
main()
"""
# (One "del sys.argv[1]" a slot: that is how "vgpu-launch status" finds vgpu-launch's own
# arguments in the command line of a vgpu-launch process.)

# What a candidate runs to say whether it would do (exit status 0): MODULES are found.
PROBE = """
import sys
from importlib.machinery import PathFinder
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]
names = %s
if sys.version_info < (3, 11):
    names += ("tomli",)
ok = sys.version_info >= %s and all(PathFinder.find_spec(n) for n in names)
sys.exit(0 if ok else 1)
"""


def modules(version: tuple[int, int]) -> list[str]:
    """The top-level modules a run imports that may be missing: deps.py's three, prctl's C
    part (built for one Python version, so a venv of another can see prctl.py without it),
    and tomli before Python 3.11 (tomllib)."""
    from vgpu_launch import deps

    names = [d.module for d in deps.DEPENDENCIES] + ["_prctl"]
    return names + (["tomli"] if version < (3, 11) else [])


def lacks(version: tuple[int, int]) -> bool:
    """Whether this interpreter cannot run vgpu-launch (nothing is imported to find out)."""
    from importlib.machinery import PathFinder

    return version < MIN_PYTHON or any(PathFinder.find_spec(m) is None for m in modules(version))


def too_old(python: str, explicit: bool, version: tuple[int, int]) -> str:
    """The one line for a Python older than MIN_PYTHON."""
    who = f"VGPU_LAUNCH_PYTHON={python}" if explicit else python
    return (
        f"vgpu-launch: {who} is Python {version[0]}.{version[1]}; vgpu-launch needs "
        f"Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later: set VGPU_LAUNCH_PYTHON to one "
        "that has python-ptrace, python-prctl and structlog"
    )


def _resolve(candidate: str) -> str | None:
    if "/" in candidate:
        return candidate if os.access(candidate, os.X_OK) else None
    import shutil  # only on the way to a hand-over: it costs more to import than the check

    return shutil.which(candidate)


def _usable(python: str, names: list[str]) -> bool:
    import subprocess

    code = PROBE % (tuple(n for n in names if n != "tomli"), MIN_PYTHON)
    try:
        return (
            subprocess.run(
                [python, "-E", "-c", code],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def start(checkout: str, candidates: str) -> None:
    """Return if vgpu-launch is to run in this interpreter (BOOT then calls cli.main, which
    nothing in the package imports); else start the next interpreter that can run it."""
    pythons = candidates.split("\n")
    version = (sys.version_info[0], sys.version_info[1])
    if lacks(version):
        names = modules(MIN_PYTHON) if version < MIN_PYTHON else modules(version)
        for candidate in pythons[1:]:
            python = _resolve(candidate) if candidate else None
            if python and _usable(python, names):
                try:
                    os.execv(python, [python, "-E", "-c", BOOT, checkout, python, *sys.argv[1:]])
                except OSError:
                    continue
        if version < MIN_PYTHON:
            # named as the user or the wrapper named it (a venv's python is a link to another)
            me = pythons[0] if "/" in pythons[0] else sys.executable
            sys.stderr.write(
                too_old(me, bool(os.environ.get("VGPU_LAUNCH_PYTHON")), version) + "\n"
            )
            sys.exit(EXIT_MISSING)
