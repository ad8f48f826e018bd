"""Proof of loading: after each injection the launcher checks /proc/PID/maps and logs a
``verify`` event (verified, or a warning with the reason), and counts them in the end event."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

from support.build import Programs
from support.launch import run
from support.procs import wait_for

from vgpu_launch.diagnostics import libcheck, verify
from vgpu_launch.trace.injector import Outcome
from vgpu_launch.trace.policy import Decision


def _verify_events(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """verify events by exe."""
    return {e["exe"]: e for e in events if e.get("event") == "verify"}


def _end(events: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [e for e in events if e.get("event") == "end"]
    assert ends, events
    return ends[-1]


def test_launcher_verifies_each_injection(programs: Programs) -> None:
    """64-bit dynamic: verified; 32-bit program with a 64-bit-only library: warning naming the
    word size; static binary: warning naming it; /bin/true: exits first (counted only)."""
    script = (
        f"{programs.sleeper} 300 & env -i {programs.sleeper32} 300 & "
        f"{programs.sleeper_static} 300 & /bin/true; wait"
    )
    res = run(["--preload", programs.libshim, "--", "sh", "-c", script])
    assert res.returncode == 0, res.describe()
    by_exe = _verify_events(res.events)

    ok = by_exe[programs.sleeper]
    assert ok["result"] == "verified" and ok["level"] == "info", res.describe()
    assert ok["mapped"] == [programs.libshim]

    w32 = by_exe[programs.sleeper32]
    assert w32["result"] == "unverified" and w32["level"] == "warning", res.describe()
    assert "wrong word size" in w32["reason"] and w32["bits"] == 32
    assert w32["missing"] == [programs.libshim]

    st = by_exe[programs.sleeper_static]
    assert st["result"] == "unverified" and st["level"] == "warning", res.describe()
    assert "static binary" in st["reason"]

    counts = _end(res.events)["verification"]
    assert counts["verified"] >= 2  # sh and the sleeper
    assert counts["unverified"] == 2
    assert counts["exited"] >= 1  # /bin/true, gone before the first check
    assert counts["skipped"] == 0
    # exited programs are not logged at info (readable logs for many short-lived helpers)
    assert "/usr/bin/true" not in by_exe and "/bin/true" not in by_exe


def test_missing_file_for_this_lib(programs: Programs) -> None:
    """$LIB/libshim.so with only a 64-bit build: the 32-bit program has no file to load."""
    res = run(["--preload", programs.shim64_lib_token, "--", programs.sleeper32, "200"])
    assert res.returncode == 0, res.describe()
    ev = _verify_events(res.events)[programs.sleeper32]
    assert ev["result"] == "unverified", res.describe()
    assert "missing file for this $LIB" in ev["reason"]
    lib32 = libcheck.token_values(4)
    if lib32 is not None:
        assert f"/tok/{lib32[0]}/libshim.so" in ev["reason"]
    res = run(["--preload", programs.shim64_lib_token, "--", programs.sleeper, "200"])
    ev = _verify_events(res.events)[programs.sleeper]
    assert ev["result"] == "verified", res.describe()


def test_musl_ignores_lib_token(programs: Programs) -> None:
    """musl's loader does not expand $LIB: the warning says so (after the last check, since
    musl's loader is mapped by the kernel and gives no sign of being done)."""
    res = run(["--preload", programs.shim64_lib_token, "--", programs.sleeper_musl, "2300"])
    assert res.returncode == 0, res.describe()
    ev = _verify_events(res.events)[programs.sleeper_musl]
    assert ev["result"] == "unverified", res.describe()
    assert "musl" in ev["reason"] and "$LIB" in ev["reason"]


def test_warning_level_keeps_only_problems(programs: Programs) -> None:
    """At --log-level warning only the unverified injections are logged."""
    script = f"{programs.sleeper} 200 & {programs.sleeper32} 200; wait"
    res = run(["--log-level", "warning", "--preload", programs.libshim, "--", "sh", "-c", script])
    assert res.returncode == 0, res.describe()
    results = [e["result"] for e in res.events if e.get("event") == "verify"]
    assert results == ["unverified"], res.describe()


# ---------------------------------------------------------------------------------------------
# the Verifier on its own


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.threads: list[threading.Thread] = []  # the thread that logged each event

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.events.append((level, event, kw))
        self.threads.append(threading.current_thread())

    def debug(self, event: str, **kw: Any) -> None:
        self._add("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)


def _outcome(pid: int, exe: str, word: int = 8, static: bool = False) -> Outcome:
    return Outcome(
        pid=pid,
        decision=Decision.INJECTED,
        exe=exe,
        argv=[exe],
        preload_after="x",
        static=static,
        word=word,
        elapsed_us=1,
    )


def test_verifier_in_process(programs: Programs) -> None:
    """The verifier on its own: mapped is verified, missing unverified, gone exited."""
    log = _Log()
    v = verify.Verifier([programs.libshim], log)
    with_lib = subprocess.Popen([programs.sleeper, "1000"], env={"LD_PRELOAD": programs.libshim})
    without = subprocess.Popen([programs.sleeper, "1000"], env={})
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    try:
        v.schedule(_outcome(with_lib.pid, programs.sleeper))
        v.schedule(_outcome(without.pid, programs.sleeper))
        v.schedule(_outcome(gone.pid, "/usr/bin/true"))
        wait_for(
            "3 verify events",
            lambda: len([e for e in log.events if e[1] == "verify"]) >= 3,
            5.0,
            0.01,
        )
        # schedule only queued: every check ran on the verifier's one thread, none on the
        # caller's (the tracer's, which must never wait on /proc)
        assert set(log.threads) == {v._thread}, log.threads
        counts = v.finish()
    finally:
        for p in (with_lib, without):
            p.kill()
            p.wait()
    results = {kw["pid"]: (level, kw["result"]) for level, ev, kw in log.events if ev == "verify"}
    assert results[with_lib.pid] == ("info", "verified")
    assert results[without.pid] == ("warning", "unverified")
    assert results[gone.pid] == ("debug", "exited")
    assert counts == {"verified": 1, "unverified": 1, "exited": 1, "skipped": 0}
    assert v._thread is not None and v._thread.daemon


def test_verifier_bounded(programs: Programs) -> None:
    """The verifier's queue is bounded: what does not fit is counted as skipped."""
    log = _Log()
    v = verify.Verifier([programs.libshim], log, delays=(5.0,), max_pending=2)
    for _ in range(5):
        v.schedule(_outcome(os.getpid(), sys.executable))
    counts = v.finish()
    assert counts["skipped"] == 3
    assert counts["verified"] + counts["unverified"] + counts["exited"] == 2
    v.schedule(_outcome(os.getpid(), sys.executable))  # after finish: ignored
    assert v.finish() == counts


def test_verifier_never_raises(programs: Programs) -> None:
    """Garbage scheduled on the verifier is logged, never raised into the tracer."""
    log = _Log()
    v = verify.Verifier([programs.libshim], log, delays=(0.0, 5.0))
    v.schedule(None)  # garbage: must not raise into the tracer, nor stop the thread
    v.schedule(object())
    v.schedule(_outcome(os.getpid(), sys.executable))
    counts = v.finish()
    assert sum(counts.values()) == 1
    assert [e for e in log.events if e[1] == "verify-failed"]
    assert [e for e in log.events if e[1] == "verify"]


def test_verifier_without_libraries_does_nothing() -> None:
    """With no library to look for, the verifier starts no thread and logs nothing."""
    log = _Log()
    v = verify.Verifier([], log)
    v.schedule(_outcome(os.getpid(), sys.executable))
    assert v.finish() == {"verified": 0, "unverified": 0, "exited": 0, "skipped": 0}
    assert v._thread is None and log.events == []


def test_maps_parsing() -> None:
    """/proc/PID/maps parsing: libraries, loader, inodes, (deleted) files, musl."""
    maps = verify.parse_maps(
        "7f0000000000-7f0000001000 r--p 00000000 fd:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f0000002000-7f0000003000 r--p 00000000 fd:01 99 /opt/shim/libvgpu.so (deleted)\n"
        "7f0000004000-7f0000005000 r--p 00000000 fd:01 77 /usr/lib64/ld-linux-x86-64.so.2\n"
        "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]\n"
    )
    assert maps.libc
    assert maps.interp == "/usr/lib64/ld-linux-x86-64.so.2"
    assert "/opt/shim/libvgpu.so" in maps.paths
    assert (os.makedev(0xFD, 1), 1234) in maps.inodes
    assert not maps.musl
    musl = verify.parse_maps(
        "7f0000000000-7f0000001000 r--p 00000000 fd:01 5 /usr/lib/x86_64-linux-musl/libc.so\n"
    )
    assert musl.musl and not musl.libc
