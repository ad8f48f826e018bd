"""Which signals vgpu-launch passes on to CMD (see docs/launcher.md for every choice)."""

from __future__ import annotations

import signal

SI_USER = 0
SI_QUEUE = -1
SI_TKILL = -6

# Never forwarded: SIGCHLD is about vgpu-launch's own children; SIGKILL/SIGSTOP can't be caught.
NOT_FORWARDED = frozenset({signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP})
# Sent by the tracer thread to wake the main thread (thread-directed, from our own pid).
WAKE = signal.SIGRTMAX
FORWARDED = frozenset(range(1, signal.NSIG)) - NOT_FORWARDED - {32, 33}  # glibc-reserved RT


def is_forwarded(code: int, sender: int, own_pid: int) -> bool:
    """Whether a signal that reached vgpu-launch should be passed on to CMD.

    ``code`` > 0 (SI_KERNEL and the like) means the kernel sent it: a terminal's SIGINT, SIGQUIT,
    SIGTSTP, SIGWINCH, SIGHUP go to the whole foreground process group, CMD included, so
    passing them on would deliver them twice. A signal from our own pid (our SIGPIPE, the
    tracer's wake-up) is ours.
    """
    return code <= 0 and sender != own_pid
