"""The first vgpu-launch code that ``bin/vgpu-launch`` runs: is this interpreter the right one?

``bin/vgpu-launch`` starts the first interpreter of its list that exists (``VGPU_LAUNCH_PYTHON``
alone when it is set; the distribution's python3 alone in the packages; else the checkout's
``.venv`` made by scripts/setup.sh, ``/usr/bin/python3``, then ``python3`` from PATH) and passes
the rest of the list along. Here, before anything else is imported, that interpreter is checked
for Python 3.10 and python-ptrace, python-prctl and structlog. If it lacks one, the next
interpreter of the list that has them all is started instead (the check then costs one probe
per candidate; when the first one is right, a path lookup per module, and nothing is imported
that the command line does not import anyway). If
none has them, vgpu-launch exits with status 125 and one line naming what is missing from the
first interpreter and the command that installs it.

This module must stay importable by any Python 3 (a too old one must still get the message),
and import nothing from the rest of the package before the check has passed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import PathFinder
from typing import NamedTuple, NoReturn

# Same code as the ptrace-refused case: vgpu-launch cannot run here.
EXIT_MISSING = 125
MIN_PYTHON = (3, 10)


class Dependency(NamedTuple):
    module: str  # the top-level module to find
    pypi: str  # the project's name on PyPI
    system: str  # the Debian and Fedora package of the system python3


DEPENDENCIES = (
    Dependency("ptrace", "python-ptrace", "python3-ptrace"),
    Dependency("prctl", "python-prctl", "python3-prctl"),
    Dependency("_prctl", "python-prctl", "python3-prctl"),  # its C part, built per Python version
    Dependency("structlog", "structlog", "python3-structlog"),
)
TOMLI = Dependency("tomli", "tomli", "python3-tomli")  # tomllib before Python 3.11

# bin/vgpu-launch runs this with "python -E -c", and so does start() for the next interpreter:
# argv is CHECKOUT (the directory holding vgpu_launch/, or "" for an installed copy), the
# newline-separated interpreters (the one running, as it was named, then those still to try),
# then vgpu-launch's own arguments. -E: PYTHONPATH and the other PYTHON* variables are CMD's,
# not vgpu-launch's; nor is the current directory a place to import from.
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
"""
# (One "del sys.argv[1]" a slot: that is how "vgpu-launch status" finds vgpu-launch's own
# arguments in the command line of a vgpu-launch process.)

# What a candidate runs to say whether it would do (exit status 0).
PROBE = f"""
import sys
from importlib.machinery import PathFinder
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]
names = {tuple(d.module for d in DEPENDENCIES)!r}
if sys.version_info < (3, 11):
    names += ("tomli",)
ok = sys.version_info >= {MIN_PYTHON!r} and all(PathFinder.find_spec(n) for n in names)
sys.exit(0 if ok else 1)
"""


def missing_dependencies(
    version: tuple[int, int] = (sys.version_info[0], sys.version_info[1]),
    find: Callable[[str], object] = PathFinder.find_spec,
) -> list[Dependency]:
    """The dependencies this interpreter cannot import, each package once."""
    wanted = list(DEPENDENCIES) + ([TOMLI] if version < (3, 11) else [])
    missing: list[Dependency] = []
    for dep in wanted:
        if find(dep.module) is None and all(m.system != dep.system for m in missing):
            missing.append(dep)
    return missing


def _which(name: str) -> str | None:
    import shutil  # only on the way to an error: it costs more to import than the check

    return shutil.which(name)


def _names(items: Sequence[str]) -> str:
    items = list(dict.fromkeys(items))
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def install_hint(
    missing: Sequence[Dependency],
    python: str,
    sys_path: Sequence[str],
    which: Callable[[str], str | None] = _which,
) -> tuple[str, str]:
    """The command that installs ``missing`` for ``python``, and a note to go with it (or "").

    The system's package manager where its packages are on that interpreter's path (Debian's
    dist-packages, Fedora's site-packages under /usr/lib), else pip for that interpreter."""
    debian = "/usr/lib/python3/dist-packages" in sys_path
    fedora = any(p.startswith(("/usr/lib/python3.", "/usr/lib64/python3."))
                 and p.endswith("/site-packages") for p in sys_path)
    system = " ".join(dict.fromkeys(d.system for d in missing))
    if debian and which("apt-get"):
        return f"apt-get install {system}", ""
    if fedora and which("dnf"):
        return f"dnf install {system}", ""
    pypi = " ".join(dict.fromkeys(d.pypi for d in missing))
    note = ""
    if any(d.pypi == "python-prctl" for d in missing):
        note = " (python-prctl needs libcap's headers to build: libcap-dev)"
    return f"{python} -m pip install {pypi}", note


def problem(
    python: str,
    explicit: bool,
    version: tuple[int, int],
    missing: Sequence[Dependency],
    sys_path: Sequence[str],
    which: Callable[[str], str | None] = _which,
) -> str:
    """The one line that says what ``python`` lacks and how to fix it."""
    who = f"VGPU_LAUNCH_PYTHON={python}" if explicit else python
    alternative = ("or unset VGPU_LAUNCH_PYTHON" if explicit
                   else "or set VGPU_LAUNCH_PYTHON to a python3 that has them")
    if version < MIN_PYTHON:
        return (f"vgpu-launch: {who} is Python {version[0]}.{version[1]}; vgpu-launch needs "
                f"Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later: set VGPU_LAUNCH_PYTHON to "
                f"one that has {_names([d.pypi for d in DEPENDENCIES])}")
    command, note = install_hint(missing, python, sys_path, which)
    pronoun = "it" if len({d.pypi for d in missing}) == 1 else "them"
    return (f"vgpu-launch: {who} lacks {_names([d.pypi for d in missing])}: install {pronoun} "
            f"with \"{command}\"{note}, {alternative}")


def _resolve(candidate: str) -> str | None:
    if "/" in candidate:
        return candidate if os.access(candidate, os.X_OK) else None
    return _which(candidate)


def _usable(python: str) -> bool:
    import subprocess

    try:
        return subprocess.run([python, "-E", "-c", PROBE], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def start(checkout: str, candidates: str) -> NoReturn:
    """Run vgpu-launch here, or in the next interpreter that can, or say what is missing."""
    pythons = candidates.split("\n")
    version = (sys.version_info[0], sys.version_info[1])
    missing = missing_dependencies(version)
    if not missing and version >= MIN_PYTHON:
        from vgpu_launch.cli import main

        main()
    for candidate in pythons[1:]:
        python = _resolve(candidate) if candidate else None
        if python and _usable(python):
            try:
                os.execv(python, [python, "-E", "-c", BOOT, checkout, python, *sys.argv[1:]])
            except OSError:
                continue
    # named as the user or the wrapper named it (a venv's python is a link to another)
    me = pythons[0] if "/" in pythons[0] else sys.executable
    explicit = bool(os.environ.get("VGPU_LAUNCH_PYTHON"))
    line = problem(me, explicit, version, missing, sys.path)
    sys.stderr.write(line + "\n")
    sys.exit(EXIT_MISSING)
