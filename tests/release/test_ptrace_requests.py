"""A process of the tree asks for ptrace itself (strace or gdb as CMD, LeakSanitizer, a test
harness): vgpu-launch gives up the process concerned and the request succeeds as it would
without vgpu-launch. What a released process, and a tree whose vgpu-launch died, can then do
with ptrace; the unprivileged case; strict mode."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from relsupport import (
    NOBODY,
    SHELL_LOOP,
    Built,
    Tree,
    build,
    events,
    launcher_argv,
    need,
    release,
    run_env,
    tool,
    tracer,
    tree,
    wait_for,
)

# The preload comes before libasan in the list of libraries: ASan's link-order check would
# refuse to start, under vgpu-launch or not; the same setting runs both ways.
ASAN = {"ASAN_OPTIONS": "verify_asan_link_order=0"}


@pytest.fixture(scope="module")
def built() -> Built:
    return build()


def preload(built: Built) -> list[str]:
    return ["--preload", built.librelmarker_so]


def direct(argv: list[str], built: Built, env: dict[str, str] | None = None,
           user: str | None = None) -> subprocess.CompletedProcess[str]:
    """CMD without vgpu-launch, with the same preload in its environment."""
    prefix = NOBODY if user == "nobody" else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120,
                          env=run_env(None, {"LD_PRELOAD": built.librelmarker_so, **(env or {})}))


def launched(args: list[str], env: dict[str, str] | None = None, user: str | None = None,
             ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    proc = subprocess.run(launcher_argv(args, user), capture_output=True, text=True,
                          timeout=120, env=run_env(user, env))
    return proc, events(proc.stderr)


def test_strace_f_as_cmd(built: Built) -> None:
    """`strace -f` as CMD, and run by CMD, exits 0 as it does directly (PTRACE_TRACEME
    and PTRACE_SEIZE of its children are handed to it)."""
    strace = tool("strace", "Debian: strace")
    cmd = [strace, "-f", "-o", "/dev/null", "/bin/true"]
    assert direct(cmd, built).returncode == 0
    proc, evs = launched([*preload(built), "--", *cmd])
    assert proc.returncode == 0, proc.stderr
    assert "Operation not permitted" not in proc.stderr
    reasons = {e["reason"] for e in evs if e["event"] == "released"}
    assert "ptrace-seize" in reasons, proc.stderr
    proc, _ = launched([*preload(built), "--", "/bin/sh", "-c", " ".join(cmd)])
    assert proc.returncode == 0, proc.stderr


def test_gdb_running_a_program_as_cmd(built: Built) -> None:
    """`gdb -batch -ex run PROG` as CMD: the inferior runs and exits normally, as directly."""
    gdb = tool("gdb", "Debian: gdb")
    cmd = [gdb, "-batch", "-ex", "run", "--args", built.rel_probe]
    want = direct(cmd, built)
    assert "exited normally" in want.stdout, want
    proc, _ = launched([*preload(built), "--", *cmd])
    assert proc.returncode == want.returncode == 0, proc.stderr
    assert "exited normally" in proc.stdout, proc.stdout + proc.stderr
    # the inferior asked with PTRACE_TRACEME; it got the preload before that, at its exec
    assert "relprobe" in proc.stdout and "marker=1" in proc.stdout, proc.stdout


@pytest.mark.parametrize("leak", [True, False], ids=["leak", "no-leak"])
def test_leak_sanitizer(built: Built, leak: bool) -> None:
    """A LeakSanitizer program (it attaches to its own threads from an untraced helper)
    reports its leak and exits 1, or exits 0 without one, as it does directly."""
    prog = [need(built, "rel_leak"), *(["leak"] if leak else [])]
    want = direct(prog, built, ASAN)
    assert want.returncode == (1 if leak else 0), want
    proc, evs = launched([*preload(built), "--", *prog], ASAN)
    assert proc.returncode == want.returncode, proc.stderr
    assert "does not work under ptrace" not in proc.stderr
    if leak:
        assert "ERROR: LeakSanitizer: detected memory leaks" in proc.stderr, proc.stderr
        assert "4242 byte(s) leaked" in proc.stderr, proc.stderr
        (ev,) = [e for e in evs if e["event"] == "released"]
        assert ev["reason"] == "ptrace-attach" and ev["exe"].endswith("/rel_leak"), ev


@pytest.mark.parametrize("bits", [64, 32])
@pytest.mark.parametrize("mode", ["traceme", "attach", "seize"])
def test_ptrace_requests_of_the_tree(built: Built, mode: str, bits: int) -> None:
    """PTRACE_TRACEME, PTRACE_ATTACH and PTRACE_SEIZE of a traced child work, from 64-bit and
    from i386 programs (other system call numbers, told apart by seccomp_data.arch)."""
    prog = need(built, "rel_ptrace" if bits == 64 else "rel_ptrace32")
    proc, evs = launched([*preload(built), "--", prog, mode])
    assert proc.returncode == 0 and f"{mode}=ok" in proc.stdout, proc.stdout + proc.stderr
    (ev,) = [e for e in evs if e["event"] == "released"]
    assert ev["reason"] == f"ptrace-{mode}", ev


def test_caller_between_vfork_and_exec(built: Built) -> None:
    """A vfork child that calls PTRACE_TRACEME before its exec (its parent is stuck in vfork
    until then) is released, traced by its parent, and stops at its exec for it."""
    proc, _ = launched([*preload(built), "--", built.rel_ptrace, "vfork-traceme",
                        built.rel_probe])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "vfork-traceme=ok rc=0" in proc.stdout, proc.stdout


def run_ptrace_later(t: Tree, built: Built, name: str) -> int:
    """A subshell of the tree that waits for {dir}/NAME.go, then execs rel_ptrace for each
    mode. Returns its pid."""
    go, out = f"{t.dir}/{name}.go", f"{t.dir}/{name}.out"
    script = (f"echo pid=$$ >{out}; while [ ! -e {go} ]; do sleep 0.01; done; "
              f"for m in traceme attach; do {built.rel_ptrace} $m >>{out}; done; "
              f"echo done >>{out}")
    t.send(f"sh -c '{script}' &")
    return int(wait_for(lambda: Path(out).exists() and Path(out).read_text().strip(),
                        f"{name} to start").split("pid=")[1])


def results(t: Tree, name: str) -> str:
    out = Path(t.dir) / f"{name}.out"
    (Path(t.dir) / f"{name}.go").touch()
    text: str = wait_for(lambda: "done" in out.read_text() and out.read_text(), name)
    return text


def test_a_released_process_can_still_use_ptrace(built: Built) -> None:
    """After its release, a process and the programs it starts keep the filter, and their
    ptrace requests work while vgpu-launch runs (the listener answers them)."""
    with tree([*preload(built), "--", *SHELL_LOOP]) as t:
        pid = run_ptrace_later(t, built, "later")
        wait_for(lambda: tracer(pid) != 0, "the subshell traced")
        assert release(str(pid)).returncode == 0
        text = results(t, "later")
        assert "traceme=ok" in text and "attach=ok" in text, text


def test_after_vgpu_launch_died_ptrace_requests_fail_with_enosys(built: Built) -> None:
    """vgpu-launch is killed (fail open: the tree runs on untraced): the seccomp filter stays
    in every process of the tree and nobody answers it, so PTRACE_TRACEME and PTRACE_ATTACH
    fail with ENOSYS there (docs/launcher.md says so)."""
    with tree([*preload(built), "--", *SHELL_LOOP]) as t:
        run_ptrace_later(t, built, "orphan")
        os.kill(t.launcher, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{t.launcher}/task"), "vgpu-launch's end")
        text = results(t, "orphan")
        assert "traceme=ENOSYS" in text and "attach=ENOSYS" in text, text


def test_strict_mode_refuses_unless_allowed(built: Built) -> None:
    """--strict: the request fails with EPERM, as it did before release existed, with an
    error in the log; --strict-allow-release lets it through."""
    strace = tool("strace", "Debian: strace")
    cmd = [strace, "-f", "-o", "/dev/null", "/bin/true"]
    proc, evs = launched(["--strict", *preload(built), "--", *cmd])
    assert proc.returncode == 1, proc.stderr
    assert "Operation not permitted" in proc.stderr
    refused = [e for e in evs if e["event"] == "release-refused"]
    assert refused and refused[0]["level"] == "error", proc.stderr
    assert "--strict-allow-release" in refused[0]["message"]
    assert not [e for e in evs if e["event"] == "released"]
    proc, evs = launched(["--strict", "--strict-allow-release", *preload(built), "--", *cmd])
    assert proc.returncode == 0, proc.stderr
    assert all(e["level"] == "warning" for e in evs if e["event"] == "released")


def test_turned_off(built: Built) -> None:
    """--no-ptrace-requests: the tree runs without the seccomp filter, and its ptrace requests
    get EPERM as they did before release existed."""
    script = f"grep ^Seccomp: /proc/self/status; exec {built.rel_ptrace} traceme"
    proc, evs = launched(["--no-ptrace-requests", *preload(built), "--", "/bin/sh", "-c",
                          script])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Seccomp:\t0" in proc.stdout and "traceme=EPERM" in proc.stdout, proc.stdout
    (ev,) = [e for e in evs if e["event"] == "ptrace-requests"]
    assert ev["handled"] is False and "turned off" in ev["reason"], ev
    proc, _ = launched([*preload(built), "--", "/bin/sh", "-c", script])
    assert "Seccomp:\t2" in proc.stdout and "traceme=ok" in proc.stdout, proc.stdout


@pytest.mark.parametrize("action", ["kill", "errno"])
def test_a_filter_that_refuses_seccomp(built: Built, action: str) -> None:
    """Under a seccomp filter that refuses the seccomp call itself (a unit's SystemCallFilter=
    without it; systemd's default action kills with SIGSYS), CMD still runs: vgpu-launch tries
    the call in a throwaway child first, and logs why the requests are not handed over."""
    proc = subprocess.run(
        [built.rel_nosec, action, *launcher_argv([*preload(built), "--", built.rel_probe])],
        capture_output=True, text=True, timeout=120, env=run_env())
    assert proc.returncode == 0 and "relprobe" in proc.stdout, proc.stdout + proc.stderr
    (ev,) = [e for e in events(proc.stderr) if e["event"] == "ptrace-requests"]
    assert ev["handled"] is False, ev
    assert ("kills the seccomp system call" if action == "kill" else "forbids") in ev["reason"]


def test_unprivileged_without_no_new_privs(built: Built) -> None:
    """Run by a user without CAP_SYS_ADMIN and without no_new_privs, vgpu-launch installs no
    filter (setting no_new_privs would change setuid programs): the request fails with EPERM
    as before, and the log says why. With no_new_privs already set (systemd's
    NoNewPrivileges=yes, setpriv --no-new-privs), the filter is installed and it works."""
    strace = tool("strace", "Debian: strace")
    cmd = ["--", strace, "-f", "-o", "/dev/null", "/bin/true"]
    proc, evs = launched([*preload(built), *cmd], user="nobody")
    assert proc.returncode == 1 and "Operation not permitted" in proc.stderr, proc.stderr
    (ev,) = [e for e in evs if e["event"] == "ptrace-requests"]
    assert ev["handled"] is False and "no_new_privs" in ev["reason"], ev

    argv = launcher_argv([*preload(built), *cmd], "nobody")
    argv.insert(1, "--no-new-privs")
    nnp = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                         env=run_env("nobody"))
    assert nnp.returncode == 0, nnp.stderr
    (ev,) = [e for e in events(nnp.stderr) if e["event"] == "ptrace-requests"]
    assert ev["handled"] is True
