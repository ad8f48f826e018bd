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
from dataclasses import dataclass

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


@dataclass
class Outcome:
    pid: int
    decision: Decision
    exe: str
    argv: list[str]
    preload_before: str | None
    preload_after: str | None
    static: bool
    word: int
    env_set: list[str]
    elapsed_us: int
    reason: str | None = None
    note: str | None = None


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


def inject(pid: int, policy: Policy) -> Outcome:
    """Decide and, where needed, rewrite the environment of ``pid``, stopped at its exec event.

    Never raises for a tracee-side problem: the outcome is FAILED with the reason.
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
        reason = f"{type(exc).__name__}: {exc}"
        return Outcome(
            pid,
            Decision.FAILED,
            exe,
            argv,
            None,
            None,
            static,
            word,
            [],
            (time.perf_counter_ns() - t0) // 1000,
            reason,
        )
    return Outcome(
        pid,
        result.decision,
        exe,
        argv,
        _text(result.preload_before),
        _text(result.preload_after),
        static,
        word,
        result.env_set,
        (time.perf_counter_ns() - t0) // 1000,
    )
