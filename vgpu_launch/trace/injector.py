"""Put the preload back into a program at its exec event.

At PTRACE_EVENT_EXEC the new image is loaded and its initial stack built, but no user
instruction has run. We read that stack, decide, and, if the environment must change, write a
rebuilt block just below and move the stack pointer to it (see stack.py for the layout).
Memory goes through a /proc/PID/mem descriptor opened for this exec: one opened before the exec
would read the old address space, and process_vm_writev cannot reach below the stack VMA.
"""

from __future__ import annotations

import errno
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import arch, procfs
from . import stack
from .policy import Decision, Plan, Policy, apply_to_entries, plan
from .ptracelib import PtraceError

# Enough for the arrays and strings of an ordinary process in one read (the read stops short
# at the top of the stack mapping); a larger block is read again, four times larger each time.
_FIRST_READ = 8 * 1024
_MAX_READ = 8 * 1024 * 1024
ARGV_LOGGED = 16
_ARCH = arch.current()  # raises on a machine vgpu-launch cannot trace


@dataclass(kw_only=True)
class Outcome:
    """What happened to one program at its exec event; ``to_event`` gives its log event."""

    pid: int
    decision: Decision
    exe: str = ""
    argv: list[str] = field(default_factory=list)  # the first ARGV_LOGGED entries
    preload_before: str | None = None
    preload_after: str | None = None
    static: bool = False  # no dynamic loader (no AT_BASE)
    word: int = 8  # the program's word size in bytes
    env_set: list[str] = field(default_factory=list)  # configured variables set or overridden
    elapsed_us: int = 0
    reason: str | None = None  # why it FAILED
    note: str | None = None
    former_tid: int | None = None  # a non-leader thread exec'd: its id before the exec
    killed: bool = False  # strict mode killed it at its exec stop
    # Which exec of the tree this was, and the tracer's table of each live process's latest
    # exec: a program is named by pid and exec, since a pid can exec the same file again.
    exec_seq: int = 0
    execs: Mapping[int, int] | None = field(default=None, repr=False, compare=False)

    def superseded(self) -> bool:
        """Whether the process has exec'd again, or exited, since this exec (as far as the
        tracer has seen: a newer exec counts once the tracer has handled its event)."""
        return self.execs is not None and self.execs.get(self.pid) != self.exec_seq

    @property
    def level(self) -> str:
        """The log level of its exec event: a warning only for a program that runs without
        the preload; debug for one that never ran."""
        if self.decision is Decision.FAILED:
            return "warning"
        return "debug" if self.decision is Decision.GONE else "info"

    def to_event(self, ppid: int | None) -> dict[str, Any]:
        """The fields of the ``exec`` event (docs/configuration.md lists them)."""
        fields: dict[str, Any] = {
            "pid": self.pid,
            "ppid": ppid,
            "exe": self.exe,
            "argv": self.argv,
            "preload_before": self.preload_before,
            "decision": self.decision.value,
            "preload_after": self.preload_after,
            "static": self.static,
            "bits": self.word * 8,
            "elapsed_us": self.elapsed_us,
        }
        if self.env_set:
            fields["env_set"] = self.env_set
        if self.former_tid is not None:
            fields["former_tid"] = self.former_tid
        if self.note:
            fields["note"] = self.note
        if self.reason:
            fields["reason"] = self.reason
        if self.decision is Decision.FAILED:
            fields["action"] = "killed (strict)" if self.killed else "runs without the preload"
        return fields


def _read_stack(
    fd: int, sp: int, word: int
) -> tuple[stack.InitialStack, list[bytes], list[bytes], int]:
    """The initial stack, the environment strings, the first argv strings, and the lowest
    possible address of the stack's top (exact when the read stopped short there)."""
    size = _FIRST_READ
    while True:
        buf = os.pread(fd, size, sp)
        try:
            st = stack.parse(buf, sp, word)
            env = stack.strings(buf, sp, st.envp)
            argv = stack.strings(buf, sp, st.argv[:ARGV_LOGGED])
            return st, env, argv, sp + len(buf)
        except stack.StackError:
            # A short read reached the top of the stack mapping: the data is all there.
            if len(buf) < size or size >= _MAX_READ:
                raise
            size *= 4


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="replace")


def _gone(pid: int) -> bool:
    """Whether ``pid`` has left its exec stop without us: only SIGKILL (of it, or of its
    thread group) wakes a tracee from a ptrace stop, so it is dying or dead."""
    found = procfs.stat(pid)
    return found is None or found.state != "t"


def inject(pid: int, policy: Policy) -> Outcome:
    """Decide and, where needed, rewrite the environment of ``pid``, stopped at its exec event.

    Never raises for a tracee-side problem: the outcome is FAILED with the reason, or GONE
    when the process was killed meanwhile (the error is then only a symptom of its death).
    """
    t0 = time.perf_counter_ns()
    exe = ""
    argv: list[str] = []
    word = 8
    result: Plan | None = None
    static = False
    try:
        exe = procfs.exe(pid)
        sp, word = _ARCH.read_sp(pid)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            st, env, raw_argv, top = _read_stack(fd, sp, word)
            argv = [a.decode(errors="replace") for a in raw_argv]
            static = not st.aux(stack.AT_BASE)
            result = plan(policy, env, exe=exe, secure=bool(st.aux(stack.AT_SECURE)))
            if result.changes:
                new_sp, blob = stack.rebuild(st, apply_to_entries(st.envp, result))
                # Writes through /proc/PID/mem grow the stack within *our* RLIMIT_STACK;
                # the program would die on its own, smaller limit.
                limit = resource.prlimit(pid, resource.RLIMIT_STACK)[0]
                if limit != resource.RLIM_INFINITY and top - new_sp > limit:
                    raise OSError(
                        errno.E2BIG,
                        f"the new environment needs {top - new_sp} bytes of stack, over the "
                        f"program's RLIMIT_STACK of {limit}",
                    )
                written = os.pwrite(fd, blob, new_sp)
                if written != len(blob):
                    raise OSError(errno.EIO, f"short write to the stack ({written} bytes)")
                _ARCH.write_sp(pid, new_sp)
        finally:
            os.close(fd)
    except (OSError, PtraceError, stack.StackError) as exc:
        return Outcome(
            pid=pid,
            decision=Decision.GONE if _gone(pid) else Decision.FAILED,
            exe=exe,
            argv=argv,
            static=static,
            word=word,
            elapsed_us=(time.perf_counter_ns() - t0) // 1000,
            reason=f"{type(exc).__name__}: {exc}",
        )
    return Outcome(
        pid=pid,
        decision=result.decision,
        exe=exe,
        argv=argv,
        preload_before=_text(result.preload_before),
        preload_after=_text(result.preload_after),
        static=static,
        word=word,
        env_set=result.env_set,
        elapsed_us=(time.perf_counter_ns() - t0) // 1000,
    )
