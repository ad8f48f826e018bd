"""The launcher's side of giving processes back to the operator's debuggers (docs/launcher.md,
"Giving a process back").

Two channels, both optional to running CMD (a failure of either is logged, CMD runs):

- the tree's own ptrace requests: CMD's child installs the seccomp filter of trace/seccomp.py
  before its exec and hands the filter's listener over a socketpair; a thread of
  trace/requests.py answers the requests, giving the processes concerned up first;
- ``vgpu-launch release PID``: the abstract socket of control.py.

The tracer thread does the detaching itself (trace/release.py); this module only wires the
channels to it and logs each ``released`` process.
"""

from __future__ import annotations

import socket
from typing import Any

from . import procfs
from .config import Config
from .trace.release import Job, Releaser


class Handover:
    def __init__(self, cfg: Config, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.releaser = Releaser(after_exec=cfg.release_after_exec, on_released=self._released)
        self._ours: socket.socket | None = None  # vgpu-launch's end of the socketpair
        self._cmds: socket.socket | None = None  # CMD's child's end
        self._no_filter: str | None = None  # why the filter cannot be installed here

    def before_fork(self) -> None:
        """Decide whether CMD's child installs the filter; make the socketpair if so."""
        if not self.cfg.ptrace_requests:
            return
        from .trace import seccomp

        self._no_filter = seccomp.probe()
        if self._no_filter is None:
            self._ours, self._cmds = socket.socketpair()

    def in_child(self) -> None:
        """CMD's child, traced already, just before its exec: install the filter, send the
        listener."""
        if self._ours is not None:
            self._ours.close()
        if self._cmds is not None:
            from .trace import seccomp

            seccomp.hand_over(self._cmds)
            self._cmds.close()

    def after_fork(self) -> None:
        """vgpu-launch, once CMD's child is forked: CMD's end is CMD's alone."""
        if self._cmds is not None:
            self._cmds.close()
            self._cmds = None

    def start(self) -> None:
        """Take the listener from CMD's child and answer the tree's requests in a thread of
        their own; listen for `vgpu-launch release`."""
        from . import control
        from .trace import requests, seccomp

        cfg = self.cfg
        listener, err = None, 0
        if self._ours is not None:
            with self._ours:
                listener, err = seccomp.take_over(self._ours)
        reason = seccomp.why_not(err) if err else self._no_filter
        if not cfg.ptrace_requests:
            reason = f"turned off (ptrace_requests, from {cfg.sources.get('ptrace_requests')})"
        if listener is not None:
            requests.PtraceRequests(
                listener,
                self.releaser,
                self.log,
                refuse=cfg.release_refused,
            ).start()
            self.log.info("ptrace-requests", handled=True)
        elif reason:  # (neither: CMD's child ended before it got that far)
            self.log.info(
                "ptrace-requests",
                handled=False,
                reason=reason,
                message="processes of the tree that ask to trace one another (strace -f, gdb, "
                "LeakSanitizer) get EPERM; `vgpu-launch release PID` still works",
            )
        error = control.Server(self.releaser, self.log, refuse=cfg.release_refused).start()
        if error:
            self.log.warning(
                "release-channel",
                error=error,
                message="`vgpu-launch release` cannot reach this vgpu-launch",
            )

    def _released(self, job: Job, pid: int, how: dict[str, Any]) -> None:
        """Tracer thread: ``pid`` is no longer traced."""
        fields: dict[str, Any] = {
            "pid": pid,
            "exe": procfs.exe_or_empty(pid) or None,
            "reason": job.reason,
            "by": job.by,
            **how,
        }
        if how.get("stays_stopped"):
            fields["note"] = "it was stopped by job control and stays stopped until SIGCONT"
        fields["children"] = (
            "programs it starts from now on are not followed; they keep the preload only "
            "through their environment, unless a parent strips it"
        )
        if self.cfg.strict:
            self.log.warning("released", strict_allow_release=True, **fields)
        else:
            self.log.info("released", **fields)
