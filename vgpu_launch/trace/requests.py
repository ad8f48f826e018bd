"""The tree's own ptrace requests: give up the process concerned, then let the call proceed.

A thread of its own waits on the seccomp listener (seccomp.py). For each held call:

- ``PTRACE_TRACEME``: the caller asks to be traced by its parent. If we trace it, its process
  is released; the call, interrupted by the release, is made again by the caller and then
  proceeds.
- ``PTRACE_ATTACH`` / ``PTRACE_SEIZE`` of a thread we trace: its whole process is released,
  then the call proceeds. The kernel checks the caller's rights as it always does.
- Anything else (a target we do not trace, a call into the caller's own thread group): the
  call proceeds untouched; the kernel answers it as it would without vgpu-launch.

In strict mode, without ``strict_allow_release``, a call that would need a release fails with
EPERM, which is what it got before release existed, and an error is logged.
"""

from __future__ import annotations

import errno
import select
import threading
import traceback
from typing import Any

from .. import procfs
from . import seccomp
from .release import Job, Releaser

# How long a held call waits for its release before it is let go anyway (the kernel then
# refuses it with EPERM, as the target is still traced). A target thread in an uninterruptible
# sleep (disk, a vfork parent waiting for its child) stops only when it wakes.
RELEASE_WAIT = 10.0


class PtraceRequests:
    def __init__(
        self,
        listener: int,
        releaser: Releaser,
        log: Any,
        *,
        refuse: bool,
        wait: float = RELEASE_WAIT,
    ) -> None:
        self.listener = listener
        self.releaser = releaser
        self.log = log
        self.refuse = refuse  # strict mode without strict_allow_release
        self.wait = wait
        self.handled = 0
        self.refused = 0

    def start(self) -> None:
        threading.Thread(target=self._run, name="ptrace-requests", daemon=True).start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        try:
            while True:
                events = 0
                for _fd, ev in poller.poll():
                    events |= ev
                if not events & select.POLLIN:
                    if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                        return  # no process of the tree is left to ask
                    continue
                try:
                    req = seccomp.receive(self.listener)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        continue  # the caller went away before it was read
                    raise
                try:
                    self._handle(req)
                except Exception:
                    self.log.error(
                        "ptrace-request-failed",
                        traceback=traceback.format_exc(),
                        caller=req.pid,
                        message="the call proceeds untouched",
                    )
                    seccomp.answer(self.listener, req)
        except Exception:  # never take vgpu-launch down: held calls fail with ENOSYS now
            self.log.error(
                "ptrace-requests-stopped",
                traceback=traceback.format_exc(),
                message="ptrace requests of the tree fail with ENOSYS from now on",
            )

    def _handle(self, req: seccomp.Request) -> None:
        kind = seccomp.HANDED_OVER.get(req.request)
        target_tid = req.pid if kind == "traceme" else req.target
        rel = self.releaser
        if (
            kind is None
            or target_tid <= 0
            or rel.closed
            or not rel.tracer_tid
            or procfs.tracer_of(target_tid) != rel.tracer_tid
        ):
            seccomp.answer(self.listener, req)
            return
        caller = procfs.tgid_of(req.pid) or req.pid
        target = procfs.tgid_of(target_tid)
        if target is None or (kind != "traceme" and target == caller):
            seccomp.answer(self.listener, req)  # gone, or its own thread group: the kernel's
            return
        by = {
            "pid": caller,
            "tid": req.pid,
            "exe": procfs.exe_or_empty(caller) or None,
            "request": f"PTRACE_{kind.upper()}",
        }
        if self.refuse:
            self.refused += 1
            self.log.error(
                "release-refused",
                pid=target,
                exe=procfs.exe_or_empty(target) or None,
                reason=f"ptrace-{kind}",
                by=by,
                message="strict mode: a process of the tree asked to trace a process that "
                "vgpu-launch traces; the call fails with EPERM (allow it with "
                "--strict-allow-release or strict_allow_release = true)",
            )
            seccomp.answer(self.listener, req, errno.EPERM)
            return
        self.handled += 1
        job = Job([target], f"ptrace-{kind}", by)
        rel.submit(job)
        job.done.wait(self.wait)
        # For TRACEME the caller was interrupted by its own release: this answer finds it
        # gone (False) and the caller makes the call again, untraced.
        seccomp.answer(self.listener, req)
