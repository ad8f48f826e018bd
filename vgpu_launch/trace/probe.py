"""May this process trace a child of its own, as vgpu-launch does? Asked without risking it.

A seccomp filter can make ``ptrace`` kill the caller (``SECCOMP_RET_KILL_PROCESS``: systemd's
default action for a ``SystemCallFilter=`` that leaves ptrace out); then vgpu-launch, or
``vgpu-launch doctor``, would die of SIGSYS without a word. So the first call is made by a
throw-away process, and a filter that kills costs only that process:

- ``seize_self``: the launcher's question. Under a filter, the child that will become CMD calls
  it before it waits for the tracer, and tells the tracer thread it survived; no extra fork.
  Any other refusal the tracer learns, with its reason (``refusal``), when it attaches CMD.
- ``probe``: the whole question, for ``doctor``: a throw-away child forks a target and seizes
  it with vgpu-launch's options, and reports whether that worked, and if not why, as one line.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

from .. import procfs
from ..launchers import traced_by_hint
from . import ptracelib as pt


@dataclass(frozen=True)
class Probe:
    """What the throw-away child found. ``reason``: empty when tracing works, else why not,
    in an operator's words."""

    works: bool
    reason: str = ""
    errno: int = 0  # the error PTRACE_SEIZE returned
    killed_by: int = 0  # the signal the throw-away child died of (SIGSYS: a seccomp filter)
    tracer: int = 0  # the target's TracerPid when another tracer had it first


def filtered() -> bool:
    """Whether a seccomp filter applies to this process: only a filter can kill a process for
    calling ptrace, so without one the real attempt is safe and no probe is needed."""
    return procfs.status_field("self", "Seccomp") == "2"


def refusal(err: int, target: int) -> tuple[str, int]:
    """Why the kernel refused to trace ``target`` (a child of ours, still alive: its
    TracerPid is read), in operator's words; and that TracerPid (0: none)."""
    tracer = procfs.status_field(target, "TracerPid")
    if tracer and tracer != "0":
        return (
            f"CMD is already traced by pid {tracer} ({procfs.comm(tracer)})"
            f"{traced_by_hint(tracer)}: vgpu-launch runs under a tracer that follows forks "
            "(strace -f, gdb, a vgpu-launch that cannot hand ptrace requests over)"
        ), int(tracer)
    if procfs.yama_ptrace_scope() == "3":
        return "ptrace is disabled on this host (kernel.yama.ptrace_scope = 3)", 0
    if filtered():
        return (
            "a seccomp filter (e.g. a container runtime's profile) refuses ptrace: allow ptrace "
            "in the profile"
        ), 0
    return f"ptrace refused ({errno.errorcode.get(err, err)})", 0


KILLED = (
    "a seccomp filter kills any process that calls ptrace (SIGSYS; systemd does this for a "
    "SystemCallFilter= that leaves ptrace out): allow ptrace in the filter (systemd: a drop-in "
    "with SystemCallFilter=ptrace after the other SystemCallFilter= lines)"
)


def seize_self(options: int = pt.FOLLOW) -> None:
    """PTRACE_SEIZE of the calling process itself, with ``options``: the kernel always refuses
    it (EPERM), unless a seccomp filter kills the caller first. Only for a throw-away process
    (vgpu-launch's child for CMD, before it waits for the tracer), to learn whether calling
    ptrace is fatal here."""
    pt.try_seize(os.getpid(), options)


def probe(options: int = pt.FOLLOW) -> Probe:
    """Seize a child the way vgpu-launch seizes CMD, in a throw-away child; never raises for
    what ptrace does. Call it while this process has one thread (it forks)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the throw-away child: report "errno tracer reason", exit
        code = 0
        try:
            os.close(r)
            err, tracer, reason = _attempt(options)
            os.write(w, f"{err} {tracer} {reason}".encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGSYS:
            return Probe(False, KILLED, killed_by=sig)
        return Probe(False, f"the ptrace probe died of {signal.Signals(sig).name}", killed_by=sig)
    err_s, _, rest = b"".join(chunks).decode(errors="replace").partition(" ")
    tracer_s, _, reason = rest.partition(" ")
    if not err_s.isdigit() or not tracer_s.isdigit():
        return Probe(False, "the ptrace probe failed")
    if err_s == "0":
        return Probe(True)
    return Probe(False, reason, errno=int(err_s), tracer=int(tracer_s))


def _attempt(options: int) -> tuple[int, int, str]:
    """In the throw-away child: fork a target that waits, seize it, let it go."""
    r, w = os.pipe()
    target = os.fork()
    if target == 0:
        try:
            os.close(w)
            os.read(r, 1)  # until the prober is done (or gone)
        finally:
            os._exit(0)
    os.close(r)
    try:
        pt.seize(target, options)
        return 0, 0, ""
    except pt.PtraceError as exc:
        err = exc.errno or errno.EPERM
        reason, tracer = refusal(err, target)  # while the target is alive and maybe traced
        return err, tracer, reason
    finally:
        os.close(w)
        os.waitpid(target, pt.WALL)
