"""Proof of loading: after each injection the launcher checks /proc/PID/maps and logs a
``verify`` event (verified, or a warning with the reason), and counts them in the end event."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vgpu_launch.diagnostics import libcheck, verify  # noqa: E402
from vgpu_launch.trace.injector import Outcome  # noqa: E402
from vgpu_launch.trace.policy import Decision  # noqa: E402

SLEEPER = r"""
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) { usleep(argc > 1 ? atoi(argv[1]) * 1000 : 300000); return 0; }
"""
SHIM = r"""
__attribute__((constructor)) static void shim_loaded(void) {}
int vgpu_test_shim_marker(void) { return 1; }
"""


def _cc(args: list[str]) -> None:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed (apt-get install gcc gcc-multilib)", pytrace=False)
    proc = subprocess.run(["gcc", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"gcc {' '.join(args)} failed (gcc-multilib / libc6-dev needed):\n"
                    f"{proc.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("verify")
    (d / "sleeper.c").write_text(SLEEPER)
    (d / "shim.c").write_text(SHIM)
    _cc(["-o", str(d / "sleeper"), str(d / "sleeper.c")])
    _cc(["-m32", "-o", str(d / "sleeper32"), str(d / "sleeper.c")])
    _cc(["-static", "-o", str(d / "sleeper-static"), str(d / "sleeper.c")])
    _cc(["-shared", "-fPIC", "-o", str(d / "libshim.so"), str(d / "shim.c")])
    # a $LIB layout holding only the 64-bit build
    lib64 = libcheck.token_values(8)
    assert lib64 is not None
    (d / "tok" / lib64[0]).mkdir(parents=True)
    shutil.copy(d / "libshim.so", d / "tok" / lib64[0] / "libshim.so")
    for p in d.iterdir():
        if p.is_file():
            p.chmod(0o755)
    return {"dir": d, "lib": str(d / "libshim.so"), "token": f"{d}/tok/$LIB/libshim.so",
            "sleeper": str(d / "sleeper"), "sleeper32": str(d / "sleeper32"),
            "static": str(d / "sleeper-static")}


def _verify_events(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """verify events by exe."""
    return {e["exe"]: e for e in events if e.get("event") == "verify"}


def _end(events: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [e for e in events if e.get("event") == "end"]
    assert ends, events
    return ends[-1]


def test_launcher_verifies_each_injection(run_launch: Any, built: dict[str, Any]) -> None:
    """64-bit dynamic: verified; 32-bit program with a 64-bit-only library: warning naming the
    word size; static binary: warning naming it; /bin/true: exits first (counted only)."""
    script = (f"{built['sleeper']} 300 & env -i {built['sleeper32']} 300 & "
              f"{built['static']} 300 & /bin/true; wait")
    res = run_launch(["--preload", built["lib"], "--", "sh", "-c", script])
    assert res.returncode == 0, res.describe()
    by_exe = _verify_events(res.events)

    ok = by_exe[built["sleeper"]]
    assert ok["result"] == "verified" and ok["level"] == "info", res.describe()
    assert ok["mapped"] == [built["lib"]]

    w32 = by_exe[built["sleeper32"]]
    assert w32["result"] == "unverified" and w32["level"] == "warning", res.describe()
    assert "wrong word size" in w32["reason"] and w32["bits"] == 32
    assert w32["missing"] == [built["lib"]]

    st = by_exe[built["static"]]
    assert st["result"] == "unverified" and st["level"] == "warning", res.describe()
    assert "static binary" in st["reason"]

    counts = _end(res.events)["verification"]
    assert counts["verified"] >= 2  # sh and the sleeper
    assert counts["unverified"] == 2
    assert counts["exited"] >= 1  # /bin/true, gone before the first check
    assert counts["skipped"] == 0
    # exited programs are not logged at info (readable logs for many short-lived helpers)
    assert "/usr/bin/true" not in by_exe and "/bin/true" not in by_exe


def test_missing_file_for_this_lib(run_launch: Any, built: dict[str, Any]) -> None:
    """$LIB/libshim.so with only a 64-bit build: the 32-bit program has no file to load."""
    res = run_launch(["--preload", built["token"], "--", built["sleeper32"], "200"])
    assert res.returncode == 0, res.describe()
    ev = _verify_events(res.events)[built["sleeper32"]]
    assert ev["result"] == "unverified", res.describe()
    assert "missing file for this $LIB" in ev["reason"]
    lib32 = libcheck.token_values(4)
    if lib32 is not None:
        assert f"/tok/{lib32[0]}/libshim.so" in ev["reason"]
    res = run_launch(["--preload", built["token"], "--", built["sleeper"], "200"])
    ev = _verify_events(res.events)[built["sleeper"]]
    assert ev["result"] == "verified", res.describe()


def test_musl_ignores_lib_token(run_launch: Any, built: dict[str, Any], tmp_path: Path) -> None:
    """musl's loader does not expand $LIB: the warning says so (after the last check, since
    musl's loader is mapped by the kernel and gives no sign of being done)."""
    if shutil.which("musl-gcc") is None:
        pytest.fail("musl-gcc is needed (apt-get install musl-tools)", pytrace=False)
    _cc_musl = ["musl-gcc", "-o", str(tmp_path / "sleeper-musl"), str(built["dir"] / "sleeper.c")]
    subprocess.run(_cc_musl, check=True)
    res = run_launch(["--preload", built["token"], "--", str(tmp_path / "sleeper-musl"), "2300"])
    assert res.returncode == 0, res.describe()
    ev = _verify_events(res.events)[str(tmp_path / "sleeper-musl")]
    assert ev["result"] == "unverified", res.describe()
    assert "musl" in ev["reason"] and "$LIB" in ev["reason"]


def test_warning_level_keeps_only_problems(run_launch: Any, built: dict[str, Any]) -> None:
    script = f"{built['sleeper']} 200 & {built['sleeper32']} 200; wait"
    res = run_launch(["--log-level", "warning", "--preload", built["lib"], "--", "sh", "-c",
                      script])
    assert res.returncode == 0, res.describe()
    results = [e["result"] for e in res.events if e.get("event") == "verify"]
    assert results == ["unverified"], res.describe()


# ---------------------------------------------------------------------------------------------
# the Verifier on its own


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.events.append((level, event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        self._add("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)


def _outcome(pid: int, exe: str, word: int = 8, static: bool = False) -> Outcome:
    return Outcome(pid=pid, decision=Decision.INJECTED, exe=exe, argv=[exe], preload_after="x",
                   static=static, word=word, elapsed_us=1)


def _wait_for(log: _Log, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len([e for e in log.events if e[1] == "verify"]) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_verifier_in_process(built: dict[str, Any]) -> None:
    log = _Log()
    v = verify.Verifier([built["lib"]], log)
    with_lib = subprocess.Popen([built["sleeper"], "1000"], env={"LD_PRELOAD": built["lib"]})
    without = subprocess.Popen([built["sleeper"], "1000"], env={})
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    try:
        time.sleep(0.05)
        t0 = time.perf_counter()
        v.schedule(_outcome(with_lib.pid, built["sleeper"]))
        v.schedule(_outcome(without.pid, built["sleeper"]))
        v.schedule(_outcome(gone.pid, "/usr/bin/true"))
        assert time.perf_counter() - t0 < 0.05  # cheap: a queue append (and a thread, once)
        _wait_for(log, 3)
        counts = v.finish()
    finally:
        for p in (with_lib, without):
            p.kill()
            p.wait()
    results = {kw["pid"]: (level, kw["result"]) for level, ev, kw in log.events
               if ev == "verify"}
    assert results[with_lib.pid] == ("info", "verified")
    assert results[without.pid] == ("warning", "unverified")
    assert results[gone.pid] == ("debug", "exited")
    assert counts == {"verified": 1, "unverified": 1, "exited": 1, "skipped": 0}
    assert v._thread is not None and v._thread.daemon


def test_verifier_bounded(built: dict[str, Any]) -> None:
    log = _Log()
    v = verify.Verifier([built["lib"]], log, delays=(5.0,), max_pending=2)
    for _ in range(5):
        v.schedule(_outcome(os.getpid(), sys.executable))
    counts = v.finish()
    assert counts["skipped"] == 3
    assert counts["verified"] + counts["unverified"] + counts["exited"] == 2
    v.schedule(_outcome(os.getpid(), sys.executable))  # after finish: ignored
    assert v.finish() == counts


def test_verifier_never_raises(built: dict[str, Any]) -> None:
    log = _Log()
    v = verify.Verifier([built["lib"]], log, delays=(0.0, 5.0))
    v.schedule(None)  # garbage: must not raise into the tracer, nor stop the thread
    v.schedule(object())
    v.schedule(_outcome(os.getpid(), sys.executable))
    counts = v.finish()
    assert sum(counts.values()) == 1
    assert [e for e in log.events if e[1] == "verify-failed"]
    assert [e for e in log.events if e[1] == "verify"]


def test_verifier_without_libraries_does_nothing() -> None:
    log = _Log()
    v = verify.Verifier([], log)
    v.schedule(_outcome(os.getpid(), sys.executable))
    assert v.finish() == {"verified": 0, "unverified": 0, "exited": 0, "skipped": 0}
    assert v._thread is None and log.events == []


def test_maps_parsing() -> None:
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
