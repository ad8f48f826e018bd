"""Put the preload back into a program at its exec event.

At PTRACE_EVENT_EXEC the new image is loaded and its initial stack built, but no user
instruction has run. We read that stack, decide, and, if the environment must change, write a
rebuilt block just below and move the stack pointer to it (see stack.py for the layout).
Memory goes through a /proc/PID/mem descriptor opened for this exec: one opened before the exec
would read the old address space, and process_vm_writev cannot reach below the stack VMA.
"""

from __future__ import annotations

import errno
import functools
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import arch, procfs
from . import ptracelib as pt
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
    # privileges executing it should have granted and did not (privileges.lost)
    lost: list[str] = field(default_factory=list)
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
        the preload or without its privileges; debug for one that never ran."""
        if self.decision is Decision.FAILED or self.lost:
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
        elif self.lost:
            fields["lost"] = self.lost
            fields["action"] = (
                f"runs without {', '.join(self.lost)}: a traced program gets no privileges "
                "unless vgpu-launch has CAP_SYS_PTRACE"
            )
        return fields


class _PtraceMemory:
    """A tracee's memory through PTRACE_PEEKDATA/POKEDATA, for when /proc/PID/mem is refused.

    Opening /proc/PID/mem takes the kernel's ptrace access check against the process's
    current credentials, which a process that switched to another user (or ran a setuid
    program) fails under a vgpu-launch without CAP_SYS_PTRACE. PEEKDATA/POKEDATA only need
    the process to be our tracee and dumpable. One word per request: slow, and rare.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def read(self, size: int, addr: int) -> bytes:
        """Up to ``size`` bytes at ``addr``; short where the mapping ends (EIO), like pread."""
        start = addr - addr % pt.WORD
        out = bytearray()
        for at in range(start, addr + size, pt.WORD):
            try:
                out += pt.peekdata(self.pid, at)
            except PtraceError as exc:
                if exc.errno not in (errno.EIO, errno.EFAULT):
                    raise
                break
        return bytes(out[addr - start : addr - start + size])

    def write(self, data: bytes, addr: int) -> int:
        """Write ``data`` at ``addr`` (the words at either end read first); its length."""
        start = addr - addr % pt.WORD
        end = addr + len(data)
        end += -end % pt.WORD
        buf = bytearray(self.read(end - start, start))
        if len(buf) != end - start:
            raise OSError(errno.EIO, f"cannot read {end - start} bytes at {start:#x}")
        buf[addr - start : addr - start + len(data)] = data
        for off in range(0, len(buf), pt.WORD):
            pt.pokedata(self.pid, start + off, bytes(buf[off : off + pt.WORD]))
        return len(data)


def _read_stack(
    read: Callable[[int, int], bytes], sp: int, word: int
) -> tuple[stack.InitialStack, list[bytes], list[bytes], int]:
    """The initial stack, the environment strings, the first argv strings, and the lowest
    possible address of the stack's top (exact when the read stopped short there)."""
    size = _FIRST_READ
    while True:
        buf = read(size, sp)
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


def _execfn(read: Callable[[int, int], bytes], st: stack.InitialStack) -> str:
    """The path the program was executed by (AT_EXECFN, as given to execve; relative if that
    was), for when /proc/PID/exe cannot be read."""
    addr = st.aux(stack.AT_EXECFN)
    if not addr:
        return ""
    return read(4096, addr).split(b"\0", 1)[0].decode(errors="replace")


def _closed(pid: int, word: int, t0: int) -> Outcome:
    """The outcome for a program whose memory is closed to us even through ptrace: it is not
    dumpable (its exec changed its ids, or its file is unreadable), and vgpu-launch lacks
    CAP_SYS_PTRACE. A program whose exec changed its ids runs setuid/setgid, which means
    AT_SECURE: left alone like any setuid program. Anything else is a failure."""
    found = procfs.ids(pid)
    if found is None or not found.set_id:
        raise PermissionError(
            errno.EACCES,
            f"{os.strerror(errno.EACCES)}: the program's memory is closed to vgpu-launch (it "
            "is not dumpable, e.g. an execute-only file, and vgpu-launch lacks CAP_SYS_PTRACE)",
        )
    argv = procfs.cmdline(pid) or []
    return Outcome(
        pid=pid,
        decision=Decision.SETUID,
        exe=argv[0] if argv else "",
        argv=argv[:ARGV_LOGGED],
        word=word,
        elapsed_us=(time.perf_counter_ns() - t0) // 1000,
        note=(
            f"memory and /proc/{pid}/exe closed to vgpu-launch: a setuid/setgid program "
            f"(uid {found.uid}, euid {found.euid}, gid {found.gid}, egid {found.egid}); "
            "exe is its argv[0]"
        ),
    )


def _stack_limit(pid: int) -> int:
    try:
        return resource.prlimit(pid, resource.RLIMIT_STACK)[0]
    except PermissionError:  # another user's process: /proc/PID/limits still tells
        found = procfs.stack_limit(pid)
        if found is None:
            raise
        return found


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="replace")


def _gone(pid: int) -> bool:
    """Whether ``pid`` has left its exec stop without us: only SIGKILL (of it, or of its
    thread group) wakes a tracee from a ptrace stop, so it is dying or dead. Asked of ptrace
    itself (ESRCH once a fatal signal is pending), not of /proc, which may hide a live
    process of another user (hidepid, ProtectProc=invisible)."""
    try:
        _ARCH.read_sp(pid)
    except PtraceError as exc:
        return bool(exc.errno == errno.ESRCH)
    return False


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
    note = None
    try:
        # Another user's process may be closed to us in /proc (ptrace access rules, hidepid):
        # the stack names the program, and ptrace itself reads and writes it.
        try:
            exe = procfs.exe(pid)
        except (PermissionError, FileNotFoundError):
            exe = ""
        sp, word = _ARCH.read_sp(pid)
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except (PermissionError, FileNotFoundError):
            fd = -1
        if fd >= 0:
            read: Callable[[int, int], bytes] = functools.partial(os.pread, fd)
            write: Callable[[bytes, int], int] = functools.partial(os.pwrite, fd)
        else:
            mem = _PtraceMemory(pid)
            read, write = mem.read, mem.write
            if not read(word, sp):
                return _closed(pid, word, t0)
        try:
            st, env, raw_argv, top = _read_stack(read, sp, word)
            argv = [a.decode(errors="replace") for a in raw_argv]
            if not exe:
                exe = _execfn(read, st) or (argv[0] if argv else "")
                note = f"/proc/{pid}/exe not readable: exe is the path it was executed by"
            static = not st.aux(stack.AT_BASE)
            result = plan(policy, env, exe=exe, secure=bool(st.aux(stack.AT_SECURE)))
            if result.changes:
                new_sp, blob = stack.rebuild(st, apply_to_entries(st.envp, result))
                # Writes through /proc/PID/mem grow the stack within *our* RLIMIT_STACK;
                # the program would die on its own, smaller limit.
                limit = _stack_limit(pid)
                if limit != resource.RLIM_INFINITY and top - new_sp > limit:
                    raise OSError(
                        errno.E2BIG,
                        f"the new environment needs {top - new_sp} bytes of stack, over the "
                        f"program's RLIMIT_STACK of {limit}",
                    )
                written = write(blob, new_sp)
                if written != len(blob):
                    raise OSError(errno.EIO, f"short write to the stack ({written} bytes)")
                _ARCH.write_sp(pid, new_sp)
        finally:
            if fd >= 0:
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
            note=note,
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
        note=note,
    )
