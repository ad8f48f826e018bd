"""After a tracer failure: supervise CMD untraced, like an init process, until it exits.

When the tracer thread dies (a bug, a fault), the kernel detaches every tracee and lets it
run on (in strict mode PTRACE_O_EXITKILL kills them instead), so nothing waits for ptrace any
more. vgpu-launch must still do the rest of its job: reap the orphans re-parented to it,
forward signals, and exit with CMD's status. The group-signal ledger gets no more entries
(``Cmd.traced`` is false): a group kill is recognised only while pending in CMD.
"""

from __future__ import annotations

import os
import signal
import time

from .forwarding import FORWARDED, WAKE, Cmd, Forwarder
from .siginfo import SignalWaiter
from .trace.ptracelib import WALL

# How long the main thread waits for the failed tracer thread to end before it reaps.
TRACER_END = 5.0


def supervise(cmd: Cmd, forwarder: Forwarder, tracer_tid: int) -> None:
    """Main thread: reap every child, forward signals, return once CMD's status is known."""
    forwarder.ledger.attach(None)
    _wait_ended(tracer_tid)
    # SIGCHLD is blocked in every thread since the start (launcher.py): none can take it.
    waiter = SignalWaiter(FORWARDED | {WAKE, signal.SIGCHLD})
    while True:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | WALL)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            # A stop, should the tracer thread outlast TRACER_END: not CMD's end.
            if pid == cmd.pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                cmd.status = status
                return
        info = waiter.wait()
        forwarder.ledger.began()
        if info.signo != signal.SIGCHLD:  # SIGCHLD: only a reason to reap again
            forwarder.on_signal(info)


def _wait_ended(tid: int) -> None:
    """Until the tracer thread has ended: only then does the kernel detach the tree. Before,
    it reports the tree's ptrace stops to every thread of ours, and a waitpid here would take
    them: a stop is not CMD's end, and taking a signal-delivery-stop discards its signal."""
    deadline = time.monotonic() + TRACER_END
    while tid and os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
        time.sleep(0.001)
