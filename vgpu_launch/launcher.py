"""Run CMD transparently under the tracer and leave the way CMD would have.

The main thread starts CMD, then only waits for signals (``sigwaitinfo``): it forwards them
to CMD in the order they come and, once the tracer thread reports CMD's end, exits with CMD's
status. The tracer thread (tracer.py) does every ``waitpid`` and ptrace call. Job control:
when CMD stops for a stop signal that reached vgpu-launch too (Ctrl-Z, ``kill -TSTP``),
vgpu-launch stops itself, so that a shell sees the job stopped. docs/launcher.md gives every
rule and its reason.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import prctl

from . import __version__, forwarding, log, procfs
from .command import execve, resolve
from .config import Config
from .diagnostics import libcheck
from .errors import EXIT_CANNOT_TRACE, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, LaunchError
from .sigstate import SignalState
from .trace.injector import Outcome
from .trace.policy import Decision, apply, plan
from .trace.ptracelib import PtraceError, ptrace
from .trace.release import Job, Releaser
from .trace.tracer import Tracer

_VERIFIABLE = (Decision.INJECTED, Decision.MERGED, Decision.PRESENT)
FAULT_VAR = "VGPU_LAUNCH_TEST_FAULT"  # "exec:N": raise inside the tracer at the Nth exec

# A user-sent signal that CMD may have got as well (a kill of the whole process group) while
# a thread of CMD sits in a ptrace stop: how long to wait for the tracer to say whether CMD
# took it, before forwarding it anyway.
DEDUP_WAIT = 0.1
# How long a signal CMD took stays available to match the same signal reaching vgpu-launch.
TAKEN_TTL = 2.0
# CMD's job-control stop is mirrored if a stop signal reached vgpu-launch this recently.
JOB_STOP_WINDOW = 5.0
_PTRACE_GETSIGINFO = 0x4202


def cmd_environment(cfg: Config, environ: dict[bytes, bytes]) -> list[bytes]:
    env = [k + b"=" + v for k, v in environ.items()]
    return apply(env, plan(cfg.policy(), env))


def _env_dict(entries: Sequence[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for e in entries:
        k, _, v = e.partition(b"=")
        out.setdefault(k, v)
    return out


def _ptrace_refusal(exc: PtraceError, child: int) -> str:
    """Why the kernel refused to trace our own child, in operator's words."""
    tracer = procfs.status_field(child, "TracerPid")
    if tracer and tracer != "0":
        from .trace.release import traced_by_hint

        return (
            f"CMD is already traced by pid {tracer} ({procfs.comm(tracer)})"
            f"{traced_by_hint(tracer)}: vgpu-launch runs under a tracer that follows forks "
            "(strace -f, gdb, a vgpu-launch that cannot hand ptrace requests over)"
        )
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            if f.read().strip() == "3":
                return "ptrace is disabled on this host (kernel.yama.ptrace_scope = 3)"
    except OSError:
        pass
    if procfs.status_field("self", "Seccomp") == "2":
        return (
            "a seccomp filter (e.g. a container runtime's profile) refuses ptrace: allow ptrace "
            "in the profile"
        )
    return f"ptrace refused ({errno.errorcode.get(exc.errno or 0, exc.errno)})"


class Launcher:
    def __init__(self, cfg: Config, argv: list[str], sigs: SignalState) -> None:
        self.cfg = cfg
        self.argv = argv
        self.sigs = sigs
        self.log = log.get()
        self.pid = os.getpid()
        self.cmd_pid = 0
        self.cmd_status: int | None = None
        self.tracer_error: BaseException | None = None
        self.seize_error: PtraceError | None = None
        self.main_thread = threading.main_thread().ident or 0
        self.started = time.monotonic()
        self.debug = cfg.log_level == "debug"
        # Signals CMD took from other processes while our own copy of the same signal from the
        # same sender was pending or being decided on (a kill of the group), from the tracer:
        # (when, signal, sender). Each explains one copy of ours.
        self._taken: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=256)
        self._dequeued = 0.0  # when the main thread took the signal it is deciding on
        self._waiter: forwarding.SignalWaiter | None = None
        # Queued signals we passed on in their sender's name: (when, signal, sender, value).
        self._relayed: collections.deque[tuple[float, int, int, int]] = collections.deque(
            maxlen=256
        )
        self._taken_cond = threading.Condition()
        # Job control: CMD's leader is in a group-stop; a stop signal reached us at this time.
        self._jobctl = threading.Lock()
        self._cmd_stopped = 0  # the signal CMD's leader is group-stopped for, 0: running
        self._job_stop_at: float | None = None
        # verify.Verifier: proof that the library really got mapped (its own daemon thread)
        from .diagnostics.verify import Verifier

        self.verifier: Any = Verifier(cfg.preload, self.log) if cfg.preload else None
        # Release (trace/release.py, trace/requests.py, control.py): CMD's half of the
        # seccomp listener's hand-over; the tracer's side of giving processes back.
        self._handover: socket.socket | None = None
        self.releaser = Releaser(after_exec=cfg.release_after_exec, on_released=self._released)

    # -- set-up ---------------------------------------------------------------------------

    def run(self) -> NoReturn:
        cfg = self.cfg
        if not cfg.preload and not cfg.env and not cfg.force_env:
            raise LaunchError(
                "nothing to guarantee: give --preload PATH (or VGPU_LAUNCH_PRELOAD, or preload "
                "in the configuration file)"
            )
        checks = [
            libcheck.check(p, cfg.sources.get("preload", ""), allow_insecure=cfg.allow_insecure)
            for p in cfg.preload
        ]
        env = cmd_environment(cfg, dict(os.environb))
        path = resolve(self.argv[0], os.fsdecode(_env_dict(env).get(b"PATH", b"")) or None)
        unusable = {w: [c.path for c in checks if w in c.unusable] for w in (4, 8)}
        self.log.info(
            "start",
            version=__version__,
            pid=self.pid,
            cmd=self.argv,
            executable=path,
            follow=not cfg.no_follow,
            preload_word_sizes={c.path: sorted(w * 8 for w in c.files) for c in checks},
            **cfg.summary(),
        )
        if cfg.no_follow:
            self.log.warning(
                "no-follow",
                message="CMD runs without tracing: programs it starts with an environment "
                "lacking LD_PRELOAD will run without the preload",
            )
            self.sigs.restore()
            try:
                execve(path, self.argv, _env_dict(env))
            except OSError as exc:
                raise LaunchError(
                    f"cannot run {self.argv[0]}: {exc.strerror}",
                    EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE,
                ) from None

        signal.pthread_sigmask(signal.SIG_BLOCK, forwarding.FORWARDED | {forwarding.WAKE})
        prctl.set_child_subreaper(1)
        tracer = Tracer(
            cfg.policy(),
            strict=cfg.strict,
            unusable={w: tuple(libs) for w, libs in unusable.items() if libs},
            on_exec=self._log_exec,
            on_event=self._log_event if cfg.log_level == "debug" else None,
            on_cmd_stopped=self._cmd_group_stop,
            on_signal=self._cmd_took,
            watch_signals=forwarding.GROUP_SIGNALS,
            fault_at_exec=_fault_hook(),
            releaser=self.releaser,
        )
        ready_r, ready_w = os.pipe()
        # -- release: CMD installs the seccomp filter and hands its listener over --------------
        listener_sock: socket.socket | None = None
        no_filter = None
        if cfg.ptrace_requests:
            from .trace import seccomp  # imported here, not in the child

            no_filter = seccomp.probe()
            if no_filter is None:
                listener_sock, self._handover = socket.socketpair()
        self.cmd_pid = os.fork()
        if self.cmd_pid == 0:
            if listener_sock is not None:
                listener_sock.close()
            self._child(ready_r, ready_w, path, env)
        if self._handover is not None:
            self._handover.close()
            self._handover = None  # --------------------------------------------------------
        os.close(ready_r)
        self.started = time.monotonic()
        # The tracer must get the interpreter back quickly whenever a stop arrives, even while
        # the verifier thread is busy: shorten the wait before a forced switch (default 5 ms).
        sys.setswitchinterval(0.0005)
        thread = threading.Thread(
            target=self._trace, args=(tracer, ready_w), name="tracer", daemon=True
        )
        thread.start()
        self._start_release(listener_sock, no_filter)
        self._supervise()
        thread.join(timeout=1.0)
        self._finish(tracer)

    def _child(self, ready_r: int, ready_w: int, path: str, env: list[bytes]) -> NoReturn:
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) != b"g":  # the tracer could not attach
                os._exit(EXIT_CANNOT_TRACE)
            os.close(ready_r)
            if self._handover is not None:  # release: the tree's ptrace requests come to us
                from .trace import seccomp

                seccomp.hand_over(self._handover)
                self._handover.close()
            cmd_env = _env_dict(env)
            # Socket activation: the fds are CMD's now (sd_listen_fds checks LISTEN_PID).
            if cmd_env.get(b"LISTEN_PID") == str(self.pid).encode():
                cmd_env[b"LISTEN_PID"] = str(os.getpid()).encode()
            self.sigs.restore()
            execve(path, self.argv, cmd_env)
        except OSError as exc:
            code = EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE
            os.write(2, f"vgpu-launch: cannot run {self.argv[0]}: {exc.strerror}\n".encode())
            os._exit(code)
        finally:
            os._exit(EXIT_CANNOT_TRACE)

    # -- the tracer thread ------------------------------------------------------------------

    def _trace(self, tracer: Tracer, ready_w: int) -> None:
        try:
            try:
                tracer.seize(self.cmd_pid)
            except PtraceError as exc:
                self.seize_error = exc
                return
            os.write(ready_w, b"g")
            os.close(ready_w)
            ready_w = -1
            self.cmd_status = tracer.run(self.cmd_pid)
        except BaseException as exc:  # any failure here must not stop CMD
            self.tracer_error = exc
            self.log.error(
                "tracer-failed",
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
                message="the tree runs on untraced"
                + (" (strict: PTRACE_O_EXITKILL ends it)" if self.cfg.strict else ""),
            )
        finally:
            self.releaser.close()  # nothing can be given back any more: answer the waiting
            if ready_w >= 0:
                os.close(ready_w)
            signal.pthread_kill(self.main_thread, forwarding.WAKE)

    # -- release (main thread, then threads of their own) --------------------------------------

    def _start_release(self, listener_sock: socket.socket | None,
                       no_filter: str | None) -> None:
        """Take the seccomp listener from CMD's child (trace/requests.py), and listen for
        `vgpu-launch release` (control.py). Neither is needed to run CMD: a failure is logged."""
        from . import control
        from .trace import requests, seccomp

        cfg = self.cfg
        listener, err = None, 0
        if listener_sock is not None:
            with listener_sock:
                listener, err = seccomp.take_over(listener_sock)
        reason = seccomp.why_not(err) if err else no_filter
        if not cfg.ptrace_requests:
            reason = f"turned off (ptrace_requests, from {cfg.sources.get('ptrace_requests')})"
        if listener is not None:
            requests.PtraceRequests(listener, self.releaser, self.log, strict=cfg.strict,
                                    allowed=cfg.strict_allow_release).start()
            self.log.info("ptrace-requests", handled=True)
        elif reason:  # (neither: CMD's child ended before it got that far)
            self.log.info(
                "ptrace-requests", handled=False, reason=reason,
                message="processes of the tree that ask to trace one another (strace -f, gdb, "
                "LeakSanitizer) get EPERM; `vgpu-launch release PID` still works",
            )
        error = control.Server(self.releaser, self.log, strict=cfg.strict,
                               allowed=cfg.strict_allow_release).start()
        if error:
            self.log.warning("release-channel", error=error,
                             message="`vgpu-launch release` cannot reach this vgpu-launch")

    def _released(self, job: Job, pid: int, how: dict[str, Any]) -> None:
        """Tracer thread: ``pid`` is no longer traced."""
        fields: dict[str, Any] = {"pid": pid, "exe": _readlink(f"/proc/{pid}/exe"),
                                  "reason": job.reason, "by": job.by, **how}
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

    # -- job control (both threads) -----------------------------------------------------------

    def _cmd_group_stop(self, sig: int) -> None:
        """Tracer thread: CMD's leader entered a group-stop (and is parked in PTRACE_LISTEN)."""
        with self._jobctl:
            self._cmd_stopped = sig
            if self._job_stop_due():
                self._stop_self()

    def _job_stop_reached_us(self) -> None:
        """Main thread: a stop signal reached vgpu-launch (and went on to CMD, or CMD had it)."""
        with self._jobctl:
            self._job_stop_at = time.monotonic()
            if self._cmd_stopped:
                self._stop_self()

    def _job_stop_due(self) -> bool:
        at = self._job_stop_at
        return at is not None and time.monotonic() - at < JOB_STOP_WINDOW

    def _stop_self(self) -> None:
        """With self._jobctl held: stop the whole process, both threads, until a SIGCONT.

        A shell sees the job stopped, by the same signal as CMD (bash tells "Stopped" from
        "Stopped (signal)" and "(tty input)"), and `fg` sends SIGCONT to vgpu-launch and CMD
        alike. A stop that did not reach vgpu-launch (SIGSTOP sent to CMD alone) is not
        mirrored: a SIGCONT sent to CMD alone must find the tracer running to let CMD go on.
        """
        self._job_stop_at = None
        if self.pid == 1:  # init cannot be stopped; nobody waits for it as a job anyway
            return
        sig = self._cmd_stopped
        if sig in forwarding.STOP_SIGNALS and signal.getsignal(sig) is signal.SIG_DFL:
            # Blocked in every thread (sigwaitinfo takes them): let this thread take one.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            try:
                signal.pthread_kill(threading.get_ident(), sig)
            finally:
                signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        else:
            os.kill(self.pid, signal.SIGSTOP)

    def _cmd_took(self, tid: int, sig: int) -> None:
        """Tracer thread, before ``sig`` is re-injected into ``tid``: note the signals CMD takes
        from other processes, so that one sent to the whole group is not forwarded again."""
        try:
            cmd = self.cmd_pid
            if tid != cmd and not os.path.exists(f"/proc/{cmd}/task/{tid}"):
                return  # a descendant, not a thread of CMD
            if sig == signal.SIGCONT:
                with self._jobctl:
                    self._cmd_stopped = 0
            info = _getsiginfo(tid)
            if info.code > 0 or info.pid == self.pid:
                return  # the kernel's, or one we forwarded with kill
            # Sent to the whole group, the same signal reached vgpu-launch at the same time:
            # our copy waits for the main thread (every thread blocks it), or the main thread
            # has taken it and not decided yet. The kernel moves it from the one to the other
            # between two looks, so: taken, pending, taken again.
            # (Under the lock: the main thread settles a copy under it, see _settle.)
            waiter = self._waiter
            mine = (sig, info.pid)
            with self._taken_cond:
                if info.code == forwarding.SI_QUEUE:
                    for entry in self._relayed:
                        if entry[1:] == (sig, info.pid, info.value):
                            self._relayed.remove(entry)  # one we passed on
                            return
                taken_before = waiter is not None and waiter.taken() == mine
                pending = sig in forwarding.shared_pending(self.pid)
                taken_after = waiter is not None and waiter.taken() == mine
                copies = (pending + taken_before
                          + (taken_after and not taken_before and not pending))
                # Two kills of the group whose copies merged into one pending for us are
                # one copy to explain, not two.
                held = sum(1 for e in self._taken if e[1:3] == mine)
                group_kill = held < copies
                if group_kill:
                    self._taken.append((time.monotonic(), sig, info.pid))
                    self._taken_cond.notify_all()
            if self.debug:
                self.log.debug("cmd-took", signal=_signame(sig), tid=tid, sender=info.pid,
                               group_kill=group_kill)
        except Exception:  # never disturb the tracer
            pass

    def _take(self, sig: int, sender: int) -> bool:
        """Whether CMD took ``sig`` from ``sender`` while our own copy of it was pending or
        being decided on: the same kill of the group. (A signal sent to CMD alone a moment
        before or after is not.) If so, our copy is settled: see _settle."""
        with self._taken_cond:
            if self._consume(sig, sender):
                if self._waiter is not None:
                    self._waiter.done()
                return True
        return False

    def _settle(self, sig: int, sender: int) -> None:
        """The main thread has decided on its copy of ``sig``: from now on CMD taking ``sig``
        is another kill. A record the tracer added meanwhile (CMD took its copy of the same
        kill while we decided) is this copy's: consume it, else it would stand for a later
        one."""
        with self._taken_cond:
            waiter = self._waiter
            if waiter is not None and waiter.taken() == (sig, sender):
                self._consume(sig, sender)
                waiter.done()

    def _consume(self, sig: int, sender: int) -> bool:
        # With self._taken_cond held.
        taken = self._taken
        old = time.monotonic() - TAKEN_TTL
        while taken and taken[0][0] < old:
            taken.popleft()
        for entry in taken:
            if entry[1] == sig and entry[2] == sender:
                taken.remove(entry)  # the oldest: one copy of ours explains one of CMD's
                return True
        return False

    # -- the main thread --------------------------------------------------------------------

    def _supervise(self) -> None:
        waiter = forwarding.SignalWaiter(forwarding.FORWARDED | {forwarding.WAKE})
        self._waiter = waiter
        own = self.pid
        cmd = self.cmd_pid
        while True:
            info = waiter.wait()
            self._dequeued = time.monotonic()
            if info.signo == forwarding.WAKE and info.pid == own:
                if self.seize_error is not None:
                    os.waitpid(cmd, 0)
                    raise LaunchError(
                        f"cannot trace {self.argv[0]}: {_ptrace_refusal(self.seize_error, cmd)}"
                        "; to run it untraced use --no-follow",
                        EXIT_CANNOT_TRACE,
                    )
                if self.cmd_status is not None:
                    return
                if self.tracer_error is not None:
                    self._supervise_untraced()
                    return
                continue
            self._on_signal(info)

    def _on_signal(self, info: forwarding.SigInfo) -> None:
        """One signal that reached vgpu-launch: pass it on to CMD unless CMD has it already."""
        sig = info.signo
        source = forwarding.origin(info.code, info.pid, self.pid, self.cmd_pid)
        if source == forwarding.OWN:
            return
        if source != forwarding.USER:
            self._take(sig, info.pid)  # explained by this copy: not for a later one
        if sig == signal.SIGCONT:
            with self._jobctl:
                self._job_stop_at = None
        why = ""
        if source == forwarding.FROM_CMD:
            why = "sent by CMD"
        elif source == forwarding.KERNEL:
            if not forwarding.forward_kernel_signal(
                sig, same_group=self._cmd_in_our_group(),
                session_leader=os.getsid(0) == self.pid,
            ):
                why = "from the kernel: CMD got it too, or it is about vgpu-launch"
        else:
            why = self._cmd_has_it(info)
        self._settle(sig, info.pid)
        if not why:
            self._forward(info)
        if self.debug:
            self.log.debug(
                "signal", signal=_signame(sig), code=info.code, sender=info.pid,
                action=f"not forwarded: {why}" if why else "forwarded",
            )
        # The kernel discards a pending SIGCONT when a stop signal is sent, and pending stop
        # signals when SIGCONT is sent: a copy of those that was pending for us when CMD took
        # its own (before this one was sent) may never come, and must not stand for a later one.
        if sig in forwarding.STOP_SIGNALS:
            self._forget({signal.SIGCONT})
            self._job_stop_reached_us()  # may stop us here, until a SIGCONT
        elif sig == signal.SIGCONT:
            self._forget(forwarding.STOP_SIGNALS)

    def _forget(self, sigs: frozenset[int] | set[int]) -> None:
        before = self._dequeued
        with self._taken_cond:
            for entry in [e for e in self._taken if e[1] in sigs and e[0] < before]:
                self._taken.remove(entry)

    def _cmd_in_our_group(self) -> bool:
        try:
            return os.getpgid(self.cmd_pid) == os.getpgrp()
        except OSError:
            return True

    def _cmd_has_it(self, info: forwarding.SigInfo) -> str:
        """Whether a user-sent signal reached CMD as well as us, and how we know: a ``kill`` of
        the process group (`kill %1`, `fg`, `kill 0` from a descendant). Only a standard signal
        can tell: it is pending in CMD, or the tracer saw CMD take it from the same sender.
        Forwarding a standard signal that is still pending in CMD would change nothing anyway.
        """
        sig = info.signo
        if self._take(sig, info.pid):
            return "CMD took it too (sent to the process group)"
        if sig >= signal.SIGRTMIN or self.tracer_error is not None:
            return ""  # real-time signals queue: each one sent is one to deliver
        cmd = self.cmd_pid
        if not self._cmd_in_our_group():
            return ""
        deadline = 0.0
        while True:
            if self._take(sig, info.pid):
                return "CMD took it too (sent to the process group)"
            if sig in forwarding.shared_pending(cmd):
                return "pending in CMD already (sent to the process group)"
            # Taken, but the tracer has not seen it yet: CMD waits in a ptrace stop.
            waiting = sig in forwarding.GROUP_SIGNALS and forwarding.in_ptrace_stop(cmd)
            if self._take(sig, info.pid):
                return "CMD took it too (sent to the process group)"
            if not waiting:
                return ""
            now = time.monotonic()
            if not deadline:
                deadline = now + DEDUP_WAIT
            if now >= deadline:
                return ""
            with self._taken_cond:
                self._taken_cond.wait(min(0.005, deadline - now))

    def _forward(self, info: forwarding.SigInfo) -> None:
        if self.cmd_status is not None:
            return  # CMD has been reaped: its pid may name another process already
        if info.code == forwarding.SI_QUEUE and info.signo in forwarding.GROUP_SIGNALS:
            with self._taken_cond:
                now = time.monotonic()
                while self._relayed and self._relayed[0][0] < now - TAKEN_TTL:
                    self._relayed.popleft()
                self._relayed.append((now, info.signo, info.pid, info.value))
        try:
            forwarding.send(self.cmd_pid, info)
        except ProcessLookupError:
            pass
        except OSError as exc:
            self.log.warning("signal", signal=_signame(info.signo), error=exc.strerror,
                             action="could not forward it to CMD")

    def _supervise_untraced(self) -> None:
        """The tracer thread died: reap like an init process until CMD has exited."""
        self._waiter = None
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        waiter = forwarding.SignalWaiter(
            forwarding.FORWARDED | {forwarding.WAKE, signal.SIGCHLD}
        )
        while True:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG | 0x40000000)
                except ChildProcessError:
                    pid = 0
                if pid == 0:
                    break
                if pid == self.cmd_pid:
                    self.cmd_status = status
                    return
            info = waiter.wait()
            self._dequeued = time.monotonic()
            if info.signo != signal.SIGCHLD:  # SIGCHLD: only a reason to reap again
                self._on_signal(info)

    # -- logging ----------------------------------------------------------------------------

    def _log_exec(self, o: Outcome, former: int | None) -> None:
        if self.cfg.log_level in ("warning", "error") and o.decision is not Decision.FAILED:
            # Nothing to log: skip the /proc read and the event's construction.
            if self.verifier is not None and o.decision in _VERIFIABLE:
                self.verifier.schedule(o)
            return
        fields: dict[str, Any] = {
            "pid": o.pid,
            "ppid": procfs.ppid(o.pid),
            "exe": o.exe,
            "argv": o.argv,
            "preload_before": o.preload_before,
            "decision": o.decision.value,
            "preload_after": o.preload_after,
            "static": o.static,
            "bits": o.word * 8,
            "elapsed_us": o.elapsed_us,
        }
        if o.env_set:
            fields["env_set"] = o.env_set
        if former is not None:
            fields["former_tid"] = former
        if o.note:
            fields["note"] = o.note
        if o.reason:
            fields["reason"] = o.reason
        if self.verifier is not None and o.decision in _VERIFIABLE:
            self.verifier.schedule(o)
        if o.decision is Decision.FAILED:
            fields["action"] = "killed (strict)" if self.cfg.strict else "runs without the preload"
            self.log.warning("exec", **fields)
        else:
            self.log.info("exec", **fields)

    def _log_event(self, kind: str, **fields: Any) -> None:
        self.log.debug(kind, **fields)

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, tracer: Tracer) -> NoReturn:
        status = self.cmd_status if self.cmd_status is not None else 0
        fields: dict[str, Any] = {
            "counts": tracer.stats.counts,
            "spawned": tracer.stats.spawned,
            # After a tracer failure the kernel detached every tracee: none is left.
            "tracees_left": 0 if self.tracer_error is not None else len(tracer.tracees),
            "seconds": round(time.monotonic() - self.started, 3),
            "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3),
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        if os.WIFSIGNALED(status):
            fields["cmd_signal"] = _signame(os.WTERMSIG(status))
        else:
            fields["cmd_exit"] = os.WEXITSTATUS(status)
        if self.verifier is not None:
            fields["verification"] = self.verifier.finish()
        if self.tracer_error is not None:
            fields["tracer_failed"] = True
        if self.releaser.count:
            fields["released"] = self.releaser.count
        self.log.info("end", **fields)
        exit_like(status)


def exit_like(status: int) -> NoReturn:
    """Leave the way CMD did: same exit code, or death by the same signal."""
    # A terminal that hung up, a closed pipe: CMD's status comes first.
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    if os.getpid() == 1:  # init cannot be killed by its own signal
        os._exit(128 + sig)
    # No core file of our own: CMD already dumped (or not) as configured.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    prctl.set_dumpable(False)
    if sig != signal.SIGKILL:  # SIGKILL's disposition and mask cannot be changed (EINVAL)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    signal.raise_signal(sig)
    os._exit(128 + sig)


def _fault_hook() -> int:
    spec = os.environ.get(FAULT_VAR, "")
    kind, _, n = spec.partition(":")
    return int(n) if kind == "exec" and n.isdigit() else 0


def _getsiginfo(tid: int) -> forwarding.SigInfo:
    """PTRACE_GETSIGINFO: the siginfo of the signal a tracee is stopped for."""
    buf = ctypes.create_string_buffer(128)
    ptrace(_PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return forwarding.parse_siginfo(buf.raw)


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _signame(sig: int) -> str:
    if signal.SIGRTMIN < sig < signal.SIGRTMAX:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"
