"""Mirroring CMD's job-control stops on vgpu-launch, so that a shell sees the job stopped.

A shell waits on vgpu-launch, not on CMD: when Ctrl-Z (or ``kill -TSTP %1``) stops CMD,
vgpu-launch must stop too, with the same signal, and ``fg`` (SIGCONT to the group) resumes
both. Two facts must meet: a stop signal reached vgpu-launch (main thread, ``stop_reached_us``)
and CMD's leader entered a group-stop (tracer thread, ``cmd_stopped``; the tracer parks it with
``PTRACE_LISTEN``). Whichever comes second stops the whole process, both threads, until a
SIGCONT. A stop that did not reach vgpu-launch (SIGSTOP sent to CMD alone) is not mirrored: a
SIGCONT sent to CMD alone must find the tracer running to let CMD go on. docs/launcher.md
("Job control") gives every rule.
"""

from __future__ import annotations

import os
import signal
import threading
import time

# CMD's job-control stop is mirrored if a stop signal reached vgpu-launch this recently (a
# program that handles SIGTSTP, like less or vim, stops itself a little later).
JOB_STOP_WINDOW = 5.0

STOP_SIGNALS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


class JobControl:
    """Both threads report here; the one that completes the picture stops the process."""

    def __init__(self, own_pid: int) -> None:
        self._pid = own_pid
        self._lock = threading.Lock()
        self._cmd_stopped = 0  # the signal CMD's leader is group-stopped for, 0: running
        self._stop_at: float | None = None  # when a stop signal last reached vgpu-launch

    # -- tracer thread --------------------------------------------------------------------

    def cmd_stopped(self, sig: int) -> None:
        """CMD's leader entered a group-stop for ``sig`` (and is parked in PTRACE_LISTEN)."""
        with self._lock:
            self._cmd_stopped = sig
            at = self._stop_at
            if at is not None and time.monotonic() - at < JOB_STOP_WINDOW:
                self._stop_self()

    def cmd_continued(self) -> None:
        """CMD took a SIGCONT: it runs again."""
        with self._lock:
            self._cmd_stopped = 0

    # -- main thread ----------------------------------------------------------------------

    def stop_reached_us(self) -> None:
        """A stop signal reached vgpu-launch (and went on to CMD, or CMD had it): may stop
        the process here, until a SIGCONT."""
        with self._lock:
            self._stop_at = time.monotonic()
            if self._cmd_stopped:
                self._stop_self()

    def continued(self) -> None:
        """A SIGCONT reached vgpu-launch: an earlier stop signal no longer asks for a stop."""
        with self._lock:
            self._stop_at = None

    def _stop_self(self) -> None:
        """With the lock held: stop the whole process, both threads, until a SIGCONT.

        A shell sees the job stopped, by the same signal as CMD (bash tells "Stopped" from
        "Stopped (signal)" and "(tty input)"), and `fg` sends SIGCONT to vgpu-launch and CMD
        alike.
        """
        self._stop_at = None
        if self._pid == 1:  # init cannot be stopped; nobody waits for it as a job anyway
            return
        sig = self._cmd_stopped
        if sig in STOP_SIGNALS and signal.getsignal(sig) is signal.SIG_DFL:
            # Blocked in every thread (sigwaitinfo takes them): let this thread take one.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            try:
                signal.pthread_kill(threading.get_ident(), sig)
            finally:
                signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        else:
            os.kill(self._pid, signal.SIGSTOP)
