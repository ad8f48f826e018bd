"""Finding and starting CMD the way execvp(3) and the shell do, with their exit codes for
failures."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from .errors import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, LaunchError

_SHELL = "/bin/sh"


def resolve(name: str, path_var: str | None) -> str:
    """The file ``execve`` will be given for CMD ``name``; LaunchError (126/127) if none."""
    if not name:
        raise LaunchError("no command given: vgpu-launch [OPTIONS] -- CMD [ARG...]", 2)
    if "/" in name:
        candidates = [name]
    else:
        dirs = (path_var if path_var is not None else os.defpath).split(os.pathsep)
        candidates = [os.path.join(d or ".", name) for d in dirs]
    denied: str | None = None
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            denied = denied or f"{name}: is a directory"
            continue
        if not os.access(path, os.X_OK):
            denied = denied or f"{name}: permission denied (not executable)"
            continue
        return path
    if denied:
        raise LaunchError(f"cannot run {denied}", EXIT_NOT_EXECUTABLE)
    where = "" if "/" in name else " in PATH"
    raise LaunchError(f"cannot run {name}: command not found{where}", EXIT_NOT_FOUND)


def execve(path: str, argv: list[str], env: dict[bytes, bytes]) -> None:
    """``execve`` as execvp(3) does it: a file the kernel will not run (ENOEXEC: no ``#!``
    line, not a known binary format) is run by /bin/sh as a script. Returns only by raising
    OSError (the error of the first ``execve``)."""
    try:
        os.execve(path, argv, env)
    except OSError as exc:
        if exc.errno != errno.ENOEXEC:
            raise
        with contextlib.suppress(OSError):
            os.execve(_SHELL, [_SHELL, path, *argv[1:]], env)
        raise
