"""Run CMD transparently under the tracer and leave the way CMD would have.

``Launcher.run`` is the whole life of vgpu-launch, like tini's main(): set up, start CMD,
supervise, finish. Two threads share the work. The tracer thread (trace/tracer.py) attaches CMD
before its first instruction, does every ``waitpid`` and ptrace call, and, as it is the one that
reaps CMD, logs the end and exits like CMD. The main thread blocks every forwardable signal,
takes them one at a time with ``sigwaitinfo`` and passes them on (forwarding.py), and mirrors
CMD's job-control stops (jobcontrol.py). If the tracer thread fails, the main thread supervises
CMD untraced (untraced.py) and finishes. docs/launcher.md gives every rule and its reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import prctl

from . import __version__, log, procfs, security, testhooks, untraced
from .command import execve, resolve
from .config import Config
from .diagnostics import libcheck
from .errors import EXIT_CANNOT_TRACE, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, LaunchError
from .forwarding import FORWARDED, GROUP_SIGNALS, WAKE, Cmd, Forwarder, signame
from .handover import Handover
from .jobcontrol import JobControl
from .siginfo import SignalWaiter
from .sigstate import SignalState
from .trace import probe
from .trace.injector import Outcome
from .trace.policy import apply, plan
from .trace.ptracelib import PtraceError
from .trace.tracer import Tracer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.signal.restype = ctypes.c_void_p
_libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]


def cmd_environment(cfg: Config, environ: dict[bytes, bytes]) -> list[bytes]:
    env = [k + b"=" + v for k, v in environ.items()]
    return apply(env, plan(cfg.policy(), env))


def _env_dict(entries: Sequence[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for e in entries:
        k, _, v = e.partition(b"=")
        out.setdefault(k, v)
    return out


def set_up(
    cfg: Config, argv: list[str], log_: Any
) -> tuple[str, list[bytes], dict[int, tuple[str, ...]]]:
    """Check the preload libraries, build CMD's environment, find CMD, log the start.
    Returns CMD's path, its environment, and the libraries each word size cannot load."""
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
    path = resolve(argv[0], os.fsdecode(_env_dict(env).get(b"PATH", b"")) or None)
    unusable = {w: tuple(c.path for c in checks if w in c.unusable) for w in (4, 8)}
    log_.info(
        "start",
        version=__version__,
        pid=os.getpid(),
        cmd=argv,
        executable=path,
        follow=not cfg.no_follow,
        preload_word_sizes={c.path: sorted(w * 8 for w in c.files) for c in checks},
        **cfg.summary(),
        **security.start_fields(),
    )
    return path, env, {w: libs for w, libs in unusable.items() if libs}


class ExecLog:
    """The tracer thread's callbacks for the log: every exec's decision, and (debug) every
    other event."""

    def __init__(self, cfg: Config, log: Any, verifier: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.verifier = verifier

    def on_exec(self, o: Outcome) -> None:
        """One ``exec`` event per program (a warning when it runs without the preload), and
        the programs given the preload queued for the verifier."""
        if self.verifier is not None and o.decision.gives_preload:
            self.verifier.schedule(o)
        if o.level == "info" and self.cfg.log_level in ("warning", "error"):
            return  # nothing to log: skip the /proc read and the event's construction
        getattr(self.log, o.level)("exec", **o.to_event(procfs.ppid(o.pid)))

    def on_event(self, kind: str, **fields: Any) -> None:
        self.log.debug(kind, **fields)


class Launcher:
    def __init__(self, cfg: Config, argv: list[str], sigs: SignalState) -> None:
        self.cfg = cfg
        self.argv = argv
        self.sigs = sigs
        self.log = log.get()
        self.pid = os.getpid()
        self.cmd = Cmd()
        self.tracer_error: BaseException | None = None
        self.tracer_tid = 0  # the tracer thread's kernel thread id, once started
        self.seize_refusal: str | None = None  # why the tracer could not attach CMD
        self.cmd_reaped = False  # CMD's child, dead before it could be attached, was reaped
        self.started = time.monotonic()
        # Set once the main thread has logged its start-up events: the end waits for them.
        self.set_up = threading.Event()
        self.faults = testhooks.Faults()
        # verify.Verifier: proof that the library really got mapped (its own daemon thread)
        from .diagnostics.verify import Verifier

        self.verifier: Any = Verifier(cfg.preload, self.log) if cfg.preload else None
        # giving processes back to debuggers: the tree's ptrace requests, `vgpu-launch release`
        self.handover = Handover(cfg, self.log)

    def run(self) -> NoReturn:
        """Set up, start CMD under the tracer thread, supervise, finish. Never returns: the
        process exits like CMD (the tracer thread finishes when CMD exits; this thread only
        when the tracer could not attach CMD or failed)."""
        path, env, unusable = set_up(self.cfg, self.argv, self.log)
        if self.cfg.no_follow:
            self._exec_untraced(path, env)
        jobs = JobControl(self.pid)
        events = ExecLog(self.cfg, self.log, self.verifier)
        faults = self.faults = _faults()
        forwarder = Forwarder(self.cmd, jobs, self.log, debug=self.cfg.log_level == "debug")
        tracer = Tracer(
            self.cfg.policy(),
            strict=self.cfg.strict,
            unusable=unusable,
            on_exec=events.on_exec,
            on_event=events.on_event if self.cfg.log_level == "debug" else None,
            on_cmd_stopped=jobs.cmd_stopped,
            on_signal=forwarder.cmd_took,
            watch_signals=GROUP_SIGNALS,
            fault_at_exec=faults.exec_at,
            kill_from_exec=faults.kill_from_exec,
            releaser=self.handover.releaser,
        )
        forwarder.parked = tracer.parked
        # Blocked here, before any other thread exists, so in every thread. SIGCHLD too: its
        # default action is to discard it, and any thread that did not block it would take a
        # group-wide one (CMD's end) away from the main thread's sigwaitinfo after a tracer
        # failure (untraced.py), which would then wait forever.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED | {WAKE, signal.SIGCHLD})
        prctl.set_child_subreaper(1)
        # Under a seccomp filter, calling ptrace may kill the caller (SIGSYS): CMD's child
        # makes that call first (probe.seize_self), and vgpu-launch only once it survived.
        check = tracer.options if probe.filtered() else None
        pipes = self._start_cmd(path, env, check)
        thread = threading.Thread(
            target=self._trace, args=(tracer, *pipes), name="tracer", daemon=True
        )
        thread.start()
        self.tracer_tid = thread.native_id or 0
        # The main thread waits for CMD's child to hand over the listener: the tracer must stay
        # free to serve that child meanwhile (a stop before the hand-over would deadlock it).
        try:
            if faults.start_delay:
                time.sleep(faults.start_delay)
            self.handover.start()
        finally:
            self.set_up.set()
        self._supervise(forwarder)
        thread.join(timeout=1.0)
        self._finish(tracer)

    # -- set-up ---------------------------------------------------------------------------

    def _exec_untraced(self, path: str, env: list[bytes]) -> None:
        """--no-follow: become CMD, with its environment set once (returns only by raising)."""
        self.log.warning(
            "no-follow",
            message="CMD runs without tracing: programs it starts with an environment "
            "lacking LD_PRELOAD will run without the preload",
        )
        log.shutdown()  # the queued events, before the exec ends this process
        self.sigs.restore()
        try:
            execve(path, self.argv, _env_dict(env))
        except OSError as exc:
            raise LaunchError(
                f"cannot run {self.argv[0]}: {exc.strerror}",
                EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE,
            ) from None

    def _cannot_trace(self, reason: str) -> str:
        return f"cannot trace {self.argv[0]}: {reason}; to run it untraced use --no-follow"

    # -- starting CMD -------------------------------------------------------------------------

    def _start_cmd(self, path: str, env: list[bytes], check: int | None) -> tuple[int, int]:
        """Fork CMD; it waits on a pipe until the tracer has attached it (before its first
        instruction). With ``check`` (ptrace options), it first makes the ptrace call that a
        seccomp filter may punish with death, and says on a second pipe that it survived.
        Returns the write end of the first pipe (the tracer's go) and the read end of the
        second (-1: no check)."""
        ready_r, ready_w = os.pipe()
        alive_r, alive_w = os.pipe() if check is not None else (-1, -1)
        self.handover.before_fork()
        self.cmd.pid = os.fork()
        if self.cmd.pid == 0:
            self._child(ready_r, ready_w, alive_r, alive_w, check, path, env)
        self.handover.after_fork()
        for fd in (ready_r, alive_w):
            if fd >= 0:
                os.close(fd)
        self.started = time.monotonic()
        # The tracer must get the interpreter back quickly whenever a stop arrives, even while
        # the verifier thread is busy: shorten the wait before a forced switch (default 5 ms).
        sys.setswitchinterval(0.0005)
        return ready_w, alive_r

    def _child(
        self,
        ready_r: int,
        ready_w: int,
        alive_r: int,
        alive_w: int,
        check: int | None,
        path: str,
        env: list[bytes],
    ) -> NoReturn:
        try:
            os.close(ready_w)
            if check is not None:
                os.close(alive_r)
                probe.seize_self(check)  # refused; or a seccomp filter kills us right here
                os.write(alive_w, b"a")
                os.close(alive_w)
            if os.read(ready_r, 1) != b"g":  # the tracer could not attach
                os._exit(EXIT_CANNOT_TRACE)
            os.close(ready_r)
            self.handover.in_child()  # the tree's ptrace requests come to us from now on
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

    def _trace(self, tracer: Tracer, ready_w: int, alive_r: int) -> None:
        try:
            self.cmd.status = self._serve(tracer, ready_w, alive_r)
        except BaseException as exc:  # any failure here must not stop CMD
            self.tracer_error = exc
            self.cmd.traced = False
            with contextlib.suppress(Exception):
                self.log.error(
                    "tracer-failed",
                    error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                    message="the tree runs on untraced"
                    + (" (strict: PTRACE_O_EXITKILL ends it)" if self.cfg.strict else ""),
                )
        self.handover.releaser.close()  # nothing can be given back any more: answer the waiting
        if self.cmd.status is not None:
            # CMD has exited: this thread knows it first, and finishes. Handing the status to
            # the main thread would make vgpu-launch's exit depend on that thread being there.
            # A CMD that ends at once can beat the main thread's start-up events (whether the
            # tree's ptrace requests are handled, and why not): they come first, but a main
            # thread that hangs cannot hold the exit.
            self.set_up.wait(timeout=2.0)
            self._finish(tracer)
        # It could not attach CMD, or it failed: the main thread takes over.
        signal.pthread_kill(threading.main_thread().ident or 0, WAKE)
        if self.faults.exit_delay:
            time.sleep(self.faults.exit_delay)

    def _serve(self, tracer: Tracer, ready_w: int, alive_r: int) -> int | None:
        """Attach CMD and let it start; serve until it exits: its wait status (None: it could
        not be attached, and ``seize_refusal`` says why)."""
        try:
            if alive_r >= 0 and not self._survived_ptrace(alive_r):
                return None
            try:
                tracer.seize(self.cmd.pid)
            except PtraceError as exc:
                # Now, while CMD's child waits for the go: once it has exited, a tracer that
                # had it first (strace -f) lets go of it and TracerPid no longer tells.
                self.seize_refusal = probe.refusal(exc.errno or 0, self.cmd.pid)[0]
                return None
            os.write(ready_w, b"g")
            log.release()  # CMD runs: the log writers may take the interpreter now
        finally:
            os.close(ready_w)
        return tracer.run(self.cmd.pid)

    def _survived_ptrace(self, alive_r: int) -> bool:
        """Whether CMD's child survived its ptrace call (probe.seize_self); if not, reap it
        and say why in ``seize_refusal``."""
        try:
            if os.read(alive_r, 1) == b"a":
                return True
        finally:
            os.close(alive_r)
        _, status = os.waitpid(self.cmd.pid, 0)
        self.cmd_reaped = True
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
            self.seize_refusal = probe.KILLED
        else:
            self.seize_refusal = f"CMD's child ended before it could be traced (status {status})"
        return False

    # -- the main thread --------------------------------------------------------------------

    def _supervise(self, forwarder: Forwarder) -> None:
        """Forward signals until the tracer wakes us (WAKE, from our own pid): it could not
        attach CMD, or it failed. (When CMD exits, the tracer thread finishes by itself.)
        Nothing that goes wrong with one signal ends this loop: the main thread must stay,
        or signals would no longer reach CMD."""
        waiter = SignalWaiter(FORWARDED | {WAKE})
        forwarder.ledger.attach(waiter)
        cmd = self.cmd
        while True:
            try:
                info = waiter.wait()
            except OSError as exc:
                _internal_error(self.log, "sigwaitinfo", exc)
                time.sleep(0.1)  # not a busy loop, should it persist
                continue
            forwarder.ledger.began()
            if info.signo == WAKE and info.pid == self.pid:
                if self.seize_refusal is not None:
                    if not self.cmd_reaped:
                        os.waitpid(cmd.pid, 0)
                    raise LaunchError(self._cannot_trace(self.seize_refusal), EXIT_CANNOT_TRACE)
                if cmd.status is not None:
                    return
                if self.tracer_error is not None:
                    untraced.supervise(cmd, forwarder, self.tracer_tid)
                    return
                continue
            try:
                forwarder.on_signal(info)
            except Exception as exc:
                _internal_error(self.log, f"handling {signame(info.signo)}", exc)

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, tracer: Tracer) -> NoReturn:
        """Log the end and leave the way CMD did; from whichever thread knows CMD's status.
        Nothing here may keep vgpu-launch from exiting with it."""
        status = self.cmd.status if self.cmd.status is not None else 0
        try:
            self.log.info("end", **_end_fields(self, tracer, status))
        finally:
            exit_like(status)


def _internal_error(log_: Any, what: str, exc: Exception) -> None:
    with contextlib.suppress(Exception):
        log_.error(
            "internal-error",
            error=f"{what}: {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            message="vgpu-launch goes on supervising CMD",
        )


def _end_fields(run: Launcher, tracer: Tracer, status: int) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    fields: dict[str, Any] = {
        "counts": tracer.stats.counts,
        "spawned": tracer.stats.spawned,
        # After a tracer failure the kernel detached every tracee: none is left.
        "tracees_left": 0 if run.tracer_error is not None else len(tracer.tracees),
        "seconds": round(time.monotonic() - run.started, 3),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        "max_rss_kb": usage.ru_maxrss,
    }
    if os.WIFSIGNALED(status):
        fields["cmd_signal"] = signame(os.WTERMSIG(status))
    else:
        fields["cmd_exit"] = os.WEXITSTATUS(status)
    if run.verifier is not None:
        fields["verification"] = run.verifier.finish()
    if run.tracer_error is not None:
        fields["tracer_failed"] = True
    if run.handover.releaser.count:
        fields["released"] = run.handover.releaser.count
    return fields


def exit_like(status: int) -> NoReturn:
    """Leave the way CMD did: same exit code, or death by the same signal."""
    log.shutdown()  # the end event; bounded: a stalled reader cannot hold the exit
    # A terminal that hung up, a closed pipe, no stderr at all: CMD's status comes first.
    with contextlib.suppress(OSError, ValueError, AttributeError):
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
        # libc's signal(), not Python's: this may run in the tracer thread, and nothing of
        # Python's signal handling matters any more.
        _libc.signal(sig, None)  # SIG_DFL
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    signal.raise_signal(sig)  # to this thread: its default action ends the process
    os._exit(128 + sig)


def _faults() -> testhooks.Faults:
    faults, ignored = testhooks.faults(os.environ)
    if ignored:
        log.get().warning("test-hook-ignored", message=ignored)
    return faults
