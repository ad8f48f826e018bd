"""Run CMD transparently under the tracer and leave the way CMD would have.

The main thread starts CMD, then only waits for signals (``sigwaitinfo``): it forwards them
to CMD in the order they come and, once the tracer thread reports CMD's end, exits with CMD's
status. The tracer thread (tracer.py) does every ``waitpid`` and ptrace call.
"""

from __future__ import annotations

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

from . import __version__, forwarding, libcheck, log, procfs
from .command import resolve
from .config import Config
from .errors import EXIT_CANNOT_TRACE, LaunchError
from .injector import Outcome
from .policy import Decision, apply, plan
from .ptracelib import PtraceError
from .sigstate import SignalState
from .tracer import Tracer

_VERIFIABLE = (Decision.INJECTED, Decision.MERGED, Decision.PRESENT)
FAULT_VAR = "VGPU_LAUNCH_TEST_FAULT"  # "exec:N": raise inside the tracer at the Nth exec


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
        return (
            f"CMD is already traced by pid {tracer} ({procfs.comm(tracer)}): vgpu-launch runs "
            "under a tracer that follows forks (strace -f, gdb)"
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
        self.verifier: Any = None  # verify.Verifier: proof that the library really got mapped

    # -- set-up ---------------------------------------------------------------------------

    def run(self) -> NoReturn:
        cfg = self.cfg
        if not cfg.preload and not cfg.env and not cfg.force_env:
            raise LaunchError(
                "nothing to guarantee: give --preload PATH (or VGPU_LAUNCH_PRELOAD, or preload "
                "in the configuration file)"
            )
        checks = [libcheck.check(p, cfg.sources.get("preload", "")) for p in cfg.preload]
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
                os.execve(path, self.argv, _env_dict(env))
            except OSError as exc:
                raise LaunchError(f"cannot run {self.argv[0]}: {exc.strerror}", 126) from None

        signal.pthread_sigmask(signal.SIG_BLOCK, forwarding.FORWARDED | {forwarding.WAKE})
        prctl.set_child_subreaper(1)
        tracer = Tracer(
            cfg.policy(),
            strict=cfg.strict,
            unusable={w: tuple(libs) for w, libs in unusable.items() if libs},
            on_exec=self._log_exec,
            on_event=self._log_event if cfg.log_level == "debug" else None,
            on_cmd_stopped=self._mirror_stop,
            fault_at_exec=_fault_hook(),
        )
        ready_r, ready_w = os.pipe()
        self.cmd_pid = os.fork()
        if self.cmd_pid == 0:
            self._child(ready_r, ready_w, path, env)
        os.close(ready_r)
        self.started = time.monotonic()
        thread = threading.Thread(
            target=self._trace, args=(tracer, ready_w), name="tracer", daemon=True
        )
        thread.start()
        self._supervise()
        thread.join(timeout=1.0)
        self._finish(tracer)

    def _child(self, ready_r: int, ready_w: int, path: str, env: list[bytes]) -> NoReturn:
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) != b"g":  # the tracer could not attach
                os._exit(EXIT_CANNOT_TRACE)
            os.close(ready_r)
            self.sigs.restore()
            os.execve(path, self.argv, _env_dict(env))
        except OSError as exc:
            code = 127 if exc.errno == errno.ENOENT else 126
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
        except BaseException as exc:  # noqa: BLE001 - any failure here must not stop CMD
            self.tracer_error = exc
            self.log.error(
                "tracer-failed",
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
                message="the tree runs on untraced"
                + (" (strict: PTRACE_O_EXITKILL ends it)" if self.cfg.strict else ""),
            )
        finally:
            if ready_w >= 0:
                os.close(ready_w)
            signal.pthread_kill(self.main_thread, forwarding.WAKE)

    def _mirror_stop(self, sig: int) -> None:
        # CMD entered a job-control stop: stop ourselves too, so a shell sees the job stopped.
        if self.pid != 1:
            os.kill(self.pid, signal.SIGSTOP)

    # -- the main thread --------------------------------------------------------------------

    def _supervise(self) -> None:
        wait_for = forwarding.FORWARDED | {forwarding.WAKE}
        own = self.pid
        cmd = self.cmd_pid
        while True:
            info = signal.sigwaitinfo(wait_for)
            if info.si_signo == forwarding.WAKE and info.si_pid == own:
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
                    self._supervise_untraced(wait_for)
                    return
                continue
            if forwarding.is_forwarded(info.si_code, info.si_pid, own):
                try:
                    if info.si_code == forwarding.SI_QUEUE:
                        _sigqueue(cmd, info.si_signo, info.si_status)
                    else:
                        os.kill(cmd, info.si_signo)
                except ProcessLookupError:
                    pass

    def _supervise_untraced(self, wait_for: frozenset[int] | set[int]) -> None:
        """The tracer thread died: reap like an init process until CMD has exited."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        own = self.pid
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
            info = signal.sigwaitinfo(set(wait_for) | {signal.SIGCHLD})
            if info.si_signo in (signal.SIGCHLD, forwarding.WAKE):
                continue
            if forwarding.is_forwarded(info.si_code, info.si_pid, own):
                try:
                    os.kill(self.cmd_pid, info.si_signo)
                except ProcessLookupError:
                    pass

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
            "tracees_left": len(tracer.tracees),
            "seconds": round(time.monotonic() - self.started, 3),
        }
        if os.WIFSIGNALED(status):
            fields["cmd_signal"] = signal.Signals(os.WTERMSIG(status)).name
        else:
            fields["cmd_exit"] = os.WEXITSTATUS(status)
        if self.verifier is not None:
            fields["verification"] = self.verifier.finish()
        self.log.info("end", **fields)
        exit_like(status)


def exit_like(status: int) -> NoReturn:
    """Leave the way CMD did: same exit code, or death by the same signal."""
    sys.stderr.flush()
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    if os.getpid() == 1:  # init cannot be killed by its own signal
        os._exit(128 + sig)
    # No core file of our own: CMD already dumped (or not) as configured.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    prctl.set_dumpable(False)
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    signal.raise_signal(sig)
    os._exit(128 + sig)


def _fault_hook() -> int:
    spec = os.environ.get(FAULT_VAR, "")
    kind, _, n = spec.partition(":")
    return int(n) if kind == "exec" and n.isdigit() else 0


def _sigqueue(pid: int, sig: int, value: int) -> None:
    """Forward a queued signal with its value (rt_sigqueueinfo via libc's sigqueue)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class _SigVal(ctypes.Union):
        _fields_ = [("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p)]

    if libc.sigqueue(pid, sig, _SigVal(sival_int=value)) != 0:
        os.kill(pid, sig)
