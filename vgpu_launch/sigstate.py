"""The state vgpu-launch was started with, so CMD gets it back.

CPython sets SIGPIPE and SIGXFSZ to ignored before any Python code runs; ``bin/vgpu-launch``
records the ignored set (``SigIgn`` of /proc/self/status) in ``_VGPU_LAUNCH_SIGIGN`` before
starting Python, and those two bits are taken from it. Without it (an entry point made by pip),
they are taken as default, which is what a shell would have given CMD. The other dispositions
and the signal mask are untouched by CPython and read directly. (One is lost before
``bin/vgpu-launch`` runs where /bin/sh is dash: SIGCHLD ignored by vgpu-launch's parent. dash
catches SIGCHLD and runs its commands with it at default; bash restores it.)

The wrapper is a shell script, and starting Python changes the environment too: the shell
exports ``PWD`` (bash also ``SHLVL`` and ``_``; ``OLDPWD`` is recorded as well), and CPython
exports ``LC_CTYPE=C.UTF-8`` under the C locale. Apart from its two records, the wrapper
sets no variable (it runs Python with ``-E`` and puts a checkout on ``sys.path`` in its ``-c``
program). It records how each of those variables was in the environment it was given
(``/proc/$$/environ``) in ``_VGPU_LAUNCH_ENV0``, and ``capture`` puts them back, so CMD's
environment is the one vgpu-launch was given.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

SIGIGN_VAR = "_VGPU_LAUNCH_SIGIGN"
ENV0_VAR = "_VGPU_LAUNCH_ENV0"
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)
# Set up by glibc for itself (thread cancellation, setxid): left alone.
_LIBC_SIGNALS = (32, 33)


@dataclass(frozen=True)
class SignalState:
    mask: frozenset[int]
    ignored: frozenset[int]

    def restore(self) -> None:
        """In the child, before exec: dispositions and mask as vgpu-launch found them.

        Only SIG_IGN survives exec (caught signals revert to default), so it is what must
        match exactly; handlers Python installed (SIGINT's) are set back to default here as
        well, so that a signal forwarded before the exec and let through by the restored mask
        acts on the child as it would on CMD.
        """
        for sig in range(1, signal.NSIG):
            if sig in (signal.SIGKILL, signal.SIGSTOP) or sig in _LIBC_SIGNALS:
                continue
            try:
                current = signal.getsignal(sig)
            except ValueError:
                continue
            want = signal.SIG_IGN if sig in self.ignored else signal.SIG_DFL
            if current is not want:
                try:
                    signal.signal(sig, want)
                except (OSError, ValueError):
                    continue
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)


def _mask_bits(hexmask: str) -> frozenset[int]:
    bits = int(hexmask, 16)
    return frozenset(sig for sig in range(1, 65) if bits & (1 << (sig - 1)))


def restore_environment(environ: MutableMapping[str, str]) -> None:
    """Undo what starting Python through ``bin/vgpu-launch`` did to the environment.

    ``_VGPU_LAUNCH_ENV0`` holds lines ``NAME`` (was not set) or ``NAME=VALUE`` (was set to
    VALUE), for every variable the wrapper or its shell may have set or changed.
    """
    record = environ.pop(ENV0_VAR, None)
    if record is None:
        return
    for line in record.split("\n"):
        name, eq, value = line.partition("=")
        if not name or not (name.replace("_", "a").isalnum()):
            continue
        if eq:
            environ[name] = value
        else:
            environ.pop(name, None)


def hold_closed_stdio() -> frozenset[int]:
    """Fill each of fds 0, 1, 2 that vgpu-launch was started without with /dev/null, opened
    close-on-exec; returns the ones that were closed.

    CMD must start with them closed, as it would directly (``vgpu-launch ... 2>&-``), and the
    close-on-exec flag gives it that. Meanwhile nothing vgpu-launch opens (a pipe, the log
    file) can land on them, and with fd 2 closed CPython sets ``sys.stderr`` to None, which
    every write of the log, and of a one-line error, would trip over: it becomes a stream on
    /dev/null, so log lines go where they would have gone, nowhere.
    """
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
    for fd in sorted(closed):
        held = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # the lowest free fd: this one
        if held != fd:
            os.dup2(held, fd, inheritable=False)
            os.close(held)
    if 2 in closed or sys.stderr is None:
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), errors="backslashreplace", line_buffering=True
        )
    return frozenset(closed)


def capture(environ: MutableMapping[str, str]) -> SignalState:
    """Read (and remove from ``environ``) the start-up state; put the environment back as
    vgpu-launch was given it, and SIGCHLD back to default for vgpu-launch itself. Closed
    standard fds are held until CMD's exec (``hold_closed_stdio``)."""
    hold_closed_stdio()
    restore_environment(environ)
    recorded = environ.pop(SIGIGN_VAR, None)
    # Every signal but Python's two is as the exec gave it to us. The shell running the
    # wrapper has its own dispositions (bash ignores SIGQUIT, dash and bash catch SIGCHLD) but
    # restores or keeps what it was given for the commands it runs; so only SIGPIPE and
    # SIGXFSZ come from the wrapper's record (no shell touches them).
    ignored: set[int] = set()
    for sig in range(1, signal.NSIG):
        try:
            if signal.getsignal(sig) is signal.SIG_IGN and sig not in _PYTHON_IGNORES:
                ignored.add(sig)
        except ValueError:
            continue
    if recorded:
        with contextlib.suppress(ValueError):
            ignored |= _mask_bits(recorded) & set(_PYTHON_IGNORES)
    mask = frozenset(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    # vgpu-launch itself needs SIGCHLD at its default: ignored, the kernel would reap our
    # children on its own and waitpid would never report CMD's exit (CMD gets it back ignored).
    if signal.getsignal(signal.SIGCHLD) is signal.SIG_IGN:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return SignalState(mask=mask, ignored=frozenset(ignored))


__all__ = [
    "ENV0_VAR",
    "SIGIGN_VAR",
    "SignalState",
    "capture",
    "hold_closed_stdio",
    "restore_environment",
]
