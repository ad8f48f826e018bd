"""A process of the tree asks for ptrace itself (strace or gdb as CMD, LeakSanitizer, a test
harness): vgpu-launch gives up the process concerned and the request succeeds as it would
without vgpu-launch. What a released process, and a tree whose vgpu-launch died, can then do
with ptrace; the unprivileged case; strict mode."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from support import launch
from support.build import Programs
from support.launch import ShellTree, clean_env, command, run
from support.procs import tracer_pid, wait_for

# The preload comes before libasan in the list of libraries: ASan's link-order check would
# refuse to start, under vgpu-launch or not; the same setting runs both ways.
ASAN = {"ASAN_OPTIONS": "verify_asan_link_order=0"}


def preload(programs: Programs) -> list[str]:
    return ["--preload", programs.librelmarker]


def direct(
    argv: list[str], programs: Programs, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """CMD without vgpu-launch, with the same preload in its environment."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env({"LD_PRELOAD": programs.librelmarker, **(env or {})}),
    )


def test_strace_f_as_cmd(programs: Programs, strace: str) -> None:
    """`strace -f` as CMD, and run by CMD, exits 0 as it does directly (PTRACE_TRACEME
    and PTRACE_SEIZE of its children are handed to it)."""
    cmd = [strace, "-f", "-o", "/dev/null", "/bin/true"]
    assert direct(cmd, programs).returncode == 0
    res = run([*preload(programs), "--", *cmd])
    assert res.returncode == 0, res.describe()
    assert "Operation not permitted" not in res.stderr
    reasons = {e["reason"] for e in res.of("released")}
    assert "ptrace-seize" in reasons, res.describe()
    res = run([*preload(programs), "--", "/bin/sh", "-c", " ".join(cmd)])
    assert res.returncode == 0, res.describe()


def test_gdb_running_a_program_as_cmd(programs: Programs, gdb: str) -> None:
    """`gdb -batch -ex run PROG` as CMD: the inferior runs and exits normally, as directly."""
    cmd = [gdb, "-batch", "-ex", "run", "--args", programs.rel_probe]
    want = direct(cmd, programs)
    assert "exited normally" in want.stdout, want
    res = run([*preload(programs), "--", *cmd])
    assert res.returncode == want.returncode == 0, res.describe()
    assert "exited normally" in res.stdout, res.describe()
    # the inferior asked with PTRACE_TRACEME; it got the preload before that, at its exec
    assert "relprobe" in res.stdout and "marker=1" in res.stdout, res.stdout


@pytest.mark.parametrize("leak", [True, False], ids=["leak", "no-leak"])
def test_leak_sanitizer(programs: Programs, leak: bool) -> None:
    """A LeakSanitizer program (it attaches to its own threads from an untraced helper)
    reports its leak and exits 1, or exits 0 without one, as it does directly."""
    prog = [programs.rel_leak, *(["leak"] if leak else [])]
    want = direct(prog, programs, ASAN)
    assert want.returncode == (1 if leak else 0), want
    res = run([*preload(programs), "--", *prog], env=ASAN)
    assert res.returncode == want.returncode, res.describe()
    assert "does not work under ptrace" not in res.stderr
    if leak:
        assert "ERROR: LeakSanitizer: detected memory leaks" in res.stderr, res.describe()
        assert "4242 byte(s) leaked" in res.stderr, res.describe()
        (ev,) = res.of("released")
        assert ev["reason"] == "ptrace-attach" and ev["exe"].endswith("/rel_leak"), ev


@pytest.mark.parametrize("bits", [64, 32])
@pytest.mark.parametrize("mode", ["traceme", "attach", "seize"])
def test_ptrace_requests_of_the_tree(programs: Programs, mode: str, bits: int) -> None:
    """PTRACE_TRACEME, PTRACE_ATTACH and PTRACE_SEIZE of a traced child work, from 64-bit and
    from i386 programs (other system call numbers, told apart by seccomp_data.arch)."""
    prog = programs.rel_ptrace if bits == 64 else programs.rel_ptrace32
    res = run([*preload(programs), "--", prog, mode])
    assert res.returncode == 0 and f"{mode}=ok" in res.stdout, res.describe()
    (ev,) = res.of("released")
    assert ev["reason"] == f"ptrace-{mode}", ev


def test_caller_between_vfork_and_exec(programs: Programs) -> None:
    """A vfork child that calls PTRACE_TRACEME before its exec (its parent is stuck in vfork
    until then) is released, traced by its parent, and stops at its exec for it."""
    res = run([*preload(programs), "--", programs.rel_ptrace, "vfork-traceme", programs.rel_probe])
    assert res.returncode == 0, res.describe()
    assert "vfork-traceme=ok rc=0" in res.stdout, res.stdout


def run_ptrace_later(t: ShellTree, programs: Programs, name: str) -> int:
    """A subshell of the tree that waits for {dir}/NAME.go, then execs rel_ptrace for each
    mode. Returns its pid."""
    go, out = t.dir / f"{name}.go", t.dir / f"{name}.out"
    script = (
        f"echo pid=$$ >{out}; while [ ! -e {go} ]; do sleep 0.01; done; "
        f"for m in traceme attach; do {programs.rel_ptrace} $m >>{out}; done; "
        f"echo done >>{out}"
    )
    t.send(f"sh -c '{script}' &")
    return int(
        wait_for(f"{name} to start", lambda: out.exists() and out.read_text().strip()).split(
            "pid="
        )[1]
    )


def results(t: ShellTree, name: str) -> str:
    out = t.dir / f"{name}.out"
    (t.dir / f"{name}.go").touch()
    text: str = wait_for(name, lambda: "done" in out.read_text() and out.read_text(), 30)
    return text


def test_a_released_process_can_still_use_ptrace(tree: ShellTree, programs: Programs) -> None:
    """After its release, a process and the programs it starts keep the filter, and their
    ptrace requests work while vgpu-launch runs (the listener answers them)."""
    pid = run_ptrace_later(tree, programs, "later")
    wait_for("the subshell traced", lambda: tracer_pid(pid) != 0)
    assert command(["release", str(pid)]).returncode == 0
    text = results(tree, "later")
    assert "traceme=ok" in text and "attach=ok" in text, text


def test_after_vgpu_launch_died_ptrace_requests_fail_with_enosys(
    tree: ShellTree, programs: Programs
) -> None:
    """vgpu-launch is killed (fail open: the tree runs on untraced): the seccomp filter stays
    in every process of the tree and nobody answers it, so PTRACE_TRACEME and PTRACE_ATTACH
    fail with ENOSYS there (docs/launcher.md says so)."""
    run_ptrace_later(tree, programs, "orphan")
    launcher = tree.launcher
    os.kill(launcher, signal.SIGKILL)
    wait_for("vgpu-launch's end", lambda: not os.path.exists(f"/proc/{launcher}/task"))
    text = results(tree, "orphan")
    assert "traceme=ENOSYS" in text and "attach=ENOSYS" in text, text


def test_strict_mode_refuses_unless_allowed(programs: Programs, strace: str) -> None:
    """--strict: the request fails with EPERM, as it did before release existed, with an
    error in the log; --strict-allow-release lets it through."""
    cmd = [strace, "-f", "-o", "/dev/null", "/bin/true"]
    res = run(["--strict", *preload(programs), "--", *cmd])
    assert res.returncode == 1, res.describe()
    assert "Operation not permitted" in res.stderr
    refused = res.of("release-refused")
    assert refused and refused[0]["level"] == "error", res.describe()
    assert "--strict-allow-release" in refused[0]["message"]
    assert not res.of("released")
    res = run(["--strict", "--strict-allow-release", *preload(programs), "--", *cmd])
    assert res.returncode == 0, res.describe()
    assert all(e["level"] == "warning" for e in res.of("released"))


def test_turned_off(programs: Programs) -> None:
    """--no-ptrace-requests: the tree runs without the seccomp filter, and its ptrace requests
    get EPERM as they did before release existed."""
    script = f"grep ^Seccomp: /proc/self/status; exec {programs.rel_ptrace} traceme"
    res = run(["--no-ptrace-requests", *preload(programs), "--", "/bin/sh", "-c", script])
    assert res.returncode == 1, res.describe()
    assert "Seccomp:\t0" in res.stdout and "traceme=EPERM" in res.stdout, res.stdout
    (ev,) = res.of("ptrace-requests")
    assert ev["handled"] is False and "turned off" in ev["reason"], ev
    res = run([*preload(programs), "--", "/bin/sh", "-c", script])
    assert "Seccomp:\t2" in res.stdout and "traceme=ok" in res.stdout, res.stdout


@pytest.mark.parametrize("action", ["kill", "errno"])
def test_a_filter_that_refuses_seccomp(programs: Programs, action: str) -> None:
    """Under a seccomp filter that refuses the seccomp call itself (a unit's SystemCallFilter=
    without it; systemd's default action kills with SIGSYS), CMD still runs: vgpu-launch tries
    the call in a throwaway child first, and logs why the requests are not handed over."""
    res = run([*preload(programs), "--", programs.rel_probe], wrap=[programs.rel_nosec, action])
    assert res.returncode == 0 and "relprobe" in res.stdout, res.describe()
    (ev,) = res.of("ptrace-requests")
    assert ev["handled"] is False, ev
    assert ("kills the seccomp system call" if action == "kill" else "forbids") in ev["reason"]


def test_unprivileged_without_no_new_privs(programs: Programs, strace: str) -> None:
    """Run by a user without CAP_SYS_ADMIN and without no_new_privs, vgpu-launch installs no
    filter (setting no_new_privs would change setuid programs): the request fails with EPERM
    as before, and the log says why. With no_new_privs already set (systemd's
    NoNewPrivileges=yes, setpriv --no-new-privs), the filter is installed and it works."""
    cmd = ["--", strace, "-f", "-o", "/dev/null", "/bin/true"]
    res = run([*preload(programs), *cmd], user="nobody")
    assert res.returncode == 1 and "Operation not permitted" in res.stderr, res.describe()
    (ev,) = res.of("ptrace-requests")
    assert ev["handled"] is False and "no_new_privs" in ev["reason"], ev

    nnp = run([*preload(programs), *cmd], user="nobody", wrap=["setpriv", "--no-new-privs", "--"])
    assert nnp.returncode == 0, nnp.describe()
    (ev,) = nnp.of("ptrace-requests")
    assert ev["handled"] is True


def test_a_cmd_that_ends_at_once_still_gets_its_start_up_events(programs: Programs) -> None:
    """A CMD that ends before the main thread has logged whether the tree's ptrace requests
    are handled (a busy machine; here the test hook slows that thread): the event is in the
    log all the same, before the end event."""
    res = run(
        [*preload(programs), "--", "/bin/true"],
        env={"VGPU_LAUNCH_TEST_FAULT": "slow-start:200"},
        pass_fds=[launch.test_hooks_fd()],
    )
    assert res.returncode == 0, res.describe()
    names = [e["event"] for e in res.events]
    assert "ptrace-requests" in names, res.describe()
    assert names.index("ptrace-requests") < names.index("end"), names
