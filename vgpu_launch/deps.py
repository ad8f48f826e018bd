"""The Python packages vgpu-launch needs, how to install each, and which versions it runs with.

Checked before anything imports them, so that a Python without them gives one line naming the
missing packages and the commands that install them, instead of a traceback. A leaf module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass

from . import __version__
from .errors import EXIT_CANNOT_TRACE, LaunchError


@dataclass(frozen=True)
class Dependency:
    module: str  # what is imported
    pip: str  # the name on PyPI
    debian: str  # the Debian/Ubuntu package


DEPENDENCIES = (
    Dependency("ptrace", "python-ptrace", "python3-ptrace"),
    Dependency("prctl", "python-prctl", "python3-prctl"),
    Dependency("structlog", "structlog", "python3-structlog"),
)


def by_module(name: str | None) -> Dependency | None:
    """The dependency that provides module ``name`` (or a submodule of it)."""
    top = (name or "").partition(".")[0]
    return next((d for d in DEPENDENCIES if d.module == top), None)


def missing(*, load: bool = False) -> list[Dependency]:
    """The dependencies this Python cannot find; with ``load``, also those it finds but cannot
    import (a broken install). Without ``load`` nothing is imported: a run imports each
    dependency where it needs it."""
    gone = []
    for dep in DEPENDENCIES:
        try:
            if load:
                importlib.import_module(dep.module)
            elif importlib.util.find_spec(dep.module) is None:
                gone.append(dep)
        except ImportError:
            gone.append(dep)
    return gone


def _python() -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    return f"Python {version} {sys.executable or '(path unknown)'}"


def missing_message(gone: list[Dependency]) -> str:
    """One line: what is missing for which Python, and the two ways to install it."""
    modules = ", ".join(d.module for d in gone)
    debian = " ".join(d.debian for d in gone)
    pip = " ".join(d.pip for d in gone)
    return (
        f"Python module{'s' if len(gone) > 1 else ''} {modules} missing for {_python()}: "
        f"install with 'apt-get install {debian}' (for Debian's /usr/bin/python3) or "
        f"'{sys.executable or 'python3'} -m pip install {pip}'"
    )


def require(prog: str = "") -> None:
    """Raise LaunchError (exit status 125) naming every missing dependency; ``prog``, if
    given, starts the message (the subcommands print it without a prefix of their own)."""
    gone = missing()
    if gone:
        prefix = f"{prog}: " if prog else ""
        raise LaunchError(prefix + missing_message(gone), EXIT_CANNOT_TRACE)


def _version(dep: Dependency) -> str:
    # here, not at the top: importlib.metadata costs about 20 ms, and only --version needs it
    import importlib.metadata

    try:
        return importlib.metadata.version(dep.pip)
    except importlib.metadata.PackageNotFoundError:
        pass
    # installed without metadata (copied in, or a distribution's own layout)
    module = sys.modules.get(dep.module)
    found = getattr(module, "__version__", None) if module is not None else None
    return str(found) if found else "(version unknown)"


def version_report() -> tuple[str, bool]:
    """``vgpu-launch --version``: one line, in the manner of ``pip --version``: this version,
    where it is imported from, the Python and each dependency's version; or, with a dependency
    missing, one line saying which (False: vgpu-launch cannot work with this Python)."""
    here = os.path.dirname(os.path.abspath(__file__))
    head = f"vgpu-launch {__version__} from {here}"
    gone = missing(load=True)
    if gone:
        return f"{head} cannot run: {missing_message(gone)}", False
    versions = ", ".join(f"{d.pip} {_version(d)}" for d in DEPENDENCIES)
    return f"{head} ({_python()}; {versions})", True
