"""Faults and races under vgpu-launch (fail-open: the default mode), each provoked for real.

How the races are made to happen rather than hoped for:

- *Killed at a stop the tracer has not seen yet*: vgpu-launch is frozen with SIGSTOP (its tracer
  thread included); the victim then reaches its fork/vfork/clone/exec/group stop and stays there,
  unseen; it is SIGKILLed and vgpu-launch is thawed. (Thawing sends vgpu-launch a SIGCONT, which
  it forwards to CMD: harmless here.)
- *Killed between ``waitpid`` and the next ptrace call*: strace is attached to vgpu-launch and
  delays every ``ptrace`` syscall by 400 ms at entry; once strace's log shows that ``wait4``
  returned the victim's stop, the victim is SIGKILLed, and the log must show the ptrace call
  that followed failing with ESRCH.
- *A child's first stop before its parent's event*: with vgpu-launch frozen, the parent forks;
  both stop; on thaw the kernel reports the newest tracee first (strace's log shows the order).

After each: CMD's exit status is right, no process is left stopped or at all (``rtool reap``
around vgpu-launch and as CMD, see support/launch.py), and the end event's ``tracees_left`` is 0.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import launch, procs
from support.build import Programs


def preload(programs: Programs) -> list[str]:
    return ["--preload", programs.librobustmark]


def probes(out: str) -> list[dict[str, str]]:
    return [
        dict(kv.split("=", 1) for kv in line.split()[1:])
        for line in out.splitlines()
        if line.startswith("rprobe ")
    ]


def assert_clean_end(run: launch.LaunchResult, exit_code: int = 0) -> None:
    assert run.returncode == exit_code, run.describe()
    assert run.end["tracees_left"] == 0, run.describe()
    assert not run.of("tracer-failed"), run.describe()


def read_pid(path: Path) -> int:
    return int(
        procs.wait_for(str(path), lambda: path.read_text().strip() if path.exists() else None, 10)
    )


def event_tree(
    programs: Programs, pub: Path, mode: str, fifo: Path, *args: str, extra: tuple[str, ...] = ()
) -> launch.Tree:
    """CMD: rtool reap (a subreaper, so CMD ends only when its tree is gone) running
    ``rtool event MODE`` (the victim), which waits on ``fifo`` and then runs ``args``."""
    return launch.Tree(
        [
            *preload(programs),
            *extra,
            "--",
            programs.rtool,
            "reap",
            programs.rtool,
            "event",
            mode,
            str(pub / "pid"),
            str(fifo),
            *args,
        ],
    )


# ---- a tracee SIGKILLed while stopped at an event --------------------------------------------


@pytest.mark.parametrize("mode", ["fork", "vfork", "clone", "exec", "stop"])
def test_killed_at_a_stop_the_tracer_has_not_seen(programs: Programs, pub: Path, mode: str) -> None:
    """A tracee SIGKILLed at a stop the tracer has not seen yet: the run ends clean."""
    with (
        procs.fifo(pub) as fifo,
        event_tree(programs, pub, mode, fifo, programs.rprobe, "--touch", str(pub / "ran")) as tree,
    ):
        tree.tracer_ready()
        victim = read_pid(pub / "pid")
        tree.freeze()
        procs.release(fifo)
        procs.wait_for("the victim at its stop", lambda: procs.stopped([victim]), 10)
        os.kill(victim, signal.SIGKILL)
        procs.wait_for("the victim to die", lambda: procs.state(victim) in (None, "Z"), 10)
        tree.thaw()
        run = tree.wait(60)
    assert_clean_end(run)
    assert launch.reap_status(run.stdout) == signal.SIGKILL  # raw wait status: killed by SIGKILL
    if mode in ("fork", "vfork"):
        # The child was created before its parent died at the event: it runs, with the preload.
        (child,) = probes(run.stdout)
        assert child["marker"] == "1", run.describe()
    else:
        assert not probes(run.stdout)
        assert not (pub / "ran").exists()


def _strace_log_has(log: Path, pattern: str) -> bool:
    try:
        return re.search(pattern, log.read_text(), re.M) is not None
    except OSError:
        return False


def stop_strace(strace: subprocess.Popen[bytes]) -> None:
    """Detach strace (SIGINT), or kill it if it does not go."""
    strace.send_signal(signal.SIGINT)
    try:
        strace.wait(timeout=30)
    except subprocess.TimeoutExpired:
        strace.kill()
        strace.wait()


_EVENT_STOP = {
    "fork": r"PTRACE_EVENT_FORK<<16\], __WALL, NULL\) = {pid}$",
    "clone": r"PTRACE_EVENT_CLONE<<16\], __WALL, NULL\) = {pid}$",
    "exec": r"PTRACE_EVENT_EXEC<<16\], __WALL, NULL\) = {pid}$",
    "stop": r"WSTOPSIG\(s\) == SIGSTOP\}\], __WALL, NULL\) = {pid}$",
}


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("mode", sorted(_EVENT_STOP))
def test_killed_between_waitpid_and_the_next_ptrace_call(
    programs: Programs, pub: Path, mode: str
) -> None:
    """A tracee SIGKILLed between waitpid and the next ptrace call (ESRCH): a clean end."""
    log = pub / "strace.log"
    with procs.fifo(pub) as fifo, event_tree(programs, pub, mode, fifo, programs.rprobe) as tree:
        tree.tracer_ready()
        victim = read_pid(pub / "pid")
        strace = subprocess.Popen(
            [
                "strace",
                "-f",
                "-qq",
                "-e",
                "trace=ptrace,wait4",
                "-e",
                "signal=none",
                "-e",
                "inject=ptrace:delay_enter=400000",
                "-o",
                str(log),
                "-p",
                str(tree.launcher),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            procs.wait_for("strace to attach", lambda: procs.all_threads_traced(tree.launcher), 10)
            procs.release(fifo)
            stop_seen = _EVENT_STOP[mode].replace("{pid}", str(victim))
            procs.wait_for(
                "the tracer's wait4 to return the victim's stop",
                lambda: _strace_log_has(log, stop_seen),
                30,
            )
            os.kill(victim, signal.SIGKILL)
            run = tree.wait(60)
        finally:
            stop_strace(strace)
    text = log.read_text()
    assert re.search(r"ptrace\(PTRACE_\w+, \d+, .*= -1 ESRCH", text), text[-3000:]
    assert_clean_end(run)
    assert launch.reap_status(run.stdout) == signal.SIGKILL


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_child_stop_reported_before_its_parents_fork_event(programs: Programs, pub: Path) -> None:
    """A child's first stop reported before its parent's fork event: it gets the preload."""
    log = pub / "strace.log"
    with (
        procs.fifo(pub) as fifo,
        event_tree(
            programs, pub, "fork", fifo, programs.rtool, "rlimit-exec", "8388608", programs.rprobe
        ) as tree,
    ):
        tree.tracer_ready()
        parent = read_pid(pub / "pid")
        strace = subprocess.Popen(
            [
                "strace",
                "-f",
                "-qq",
                "-e",
                "trace=wait4",
                "-e",
                "signal=none",
                "-o",
                str(log),
                "-p",
                str(tree.launcher),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            procs.wait_for("strace to attach", lambda: procs.all_threads_traced(tree.launcher), 10)
            tree.freeze()
            procs.release(fifo)
            procs.wait_for(
                "parent and child at their stops",
                lambda: len(procs.stopped(tree.tree_pids())) >= 2,
                10,
            )
            tree.thaw()
            run = tree.wait(60)
        finally:
            stop_strace(strace)
    # The child, unknown to the tracer when it first stopped, exec'd with an empty
    # environment (rlimit-exec) and still got the preload.
    (child,) = probes(run.stdout)
    assert child["marker"] == "1", run.describe()
    reported = [
        (what, int(pid))
        for what, pid in re.findall(
            r"wait4\(-1, \[(.*?)\], __WALL, NULL\) = (\d+)", log.read_text()
        )
    ]
    pids = [pid for _, pid in reported]
    fork_event = reported.index(
        ("{WIFSTOPPED(s) && WSTOPSIG(s) == SIGTRAP}|PTRACE_EVENT_FORK<<16", parent)
    )
    assert pids.index(int(child["pid"])) < fork_event, reported
    assert_clean_end(run)
    assert launch.reap_status(run.stdout) == 0


# ---- storms ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_thread_churn_with_forks_whose_threads_die_at_their_first_stop(programs: Programs) -> None:
    """30,000 short-lived threads, 16 at a time, while two threads keep forking children that
    start 4 threads and exit_group() at once: those threads die between the tracer's waitpid
    and its next ptrace call (ESRCH), or before their first stop is even reported."""
    run = launch.run(
        [*preload(programs), "--", programs.rtool, "thread-churn", "30000", "16", "2"], timeout=240
    )
    assert_clean_end(run)
    m = re.search(r"threads=(\d+) forks=(\d+)", run.stdout)
    assert m and int(m.group(1)) == 30000 and int(m.group(2)) > 100, run.describe()
    # Every fork, vfork and clone was followed.
    assert run.end["spawned"] >= 30000 + int(m.group(2)), run.end


@pytest.mark.slow
def test_exec_storm(programs: Programs) -> None:
    """3,000 programs, 12 started at once, alternately by posix_spawn (CLONE_VM|CLONE_VFORK)
    and fork+execve from 12 threads, each with an empty environment: every one of them must
    get the preload (rprobe --check exits 3 otherwise)."""
    run = launch.run(
        [
            *preload(programs),
            "--",
            programs.rtool,
            "spawn-storm",
            "12",
            "250",
            programs.rprobe,
            "--check",
        ],
        timeout=240,
    )
    assert_clean_end(run)
    assert "spawned=3000 failed=0" in run.stdout, run.describe()
    assert run.end["counts"]["injected"] == 3000
    assert run.end["counts"]["failed"] == 0


def test_exec_while_threads_are_created_and_exit(programs: Programs) -> None:
    """20 execs in a row, half of them from a non-leader thread, each while two threads keep
    creating and ending threads; every exec needs the preload put back."""
    run = launch.run(
        [*preload(programs), "--", programs.rtool, "exec-churn", "20", programs.rprobe], timeout=120
    )
    assert_clean_end(run)
    (probe,) = probes(run.stdout)
    assert probe["marker"] == "1", run.describe()
    execs = run.of("exec")
    assert len(execs) == 22, run.describe()  # CMD, 20 re-execs, rprobe
    assert all(e["decision"] == "injected" for e in execs[1:]), run.describe()
    # A non-leader exec is reported under the leader's id with the former thread id.
    assert sum("former_tid" in e for e in execs) >= 10, run.describe()


# ---- the image and the stack -------------------------------------------------------------------


def test_execute_only_image_as_root(programs: Programs, pub: Path) -> None:
    """chmod 111: the kernel makes the process undumpable; root's tracer (CAP_SYS_PTRACE) may
    still read and write its memory."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    xonly = pub / "xonly"
    shutil.copy(programs.rprobe, xonly)
    xonly.chmod(0o111)
    run = launch.run([*preload(programs), "--", "env", "-i", str(xonly)])
    assert_clean_end(run)
    (probe,) = probes(run.stdout)
    assert probe["marker"] == "1"
    assert run.execs("/xonly")[0]["decision"] == "injected"


def test_execute_only_image_as_an_unprivileged_user(programs: Programs, pub: Path) -> None:
    """Run as nobody, the tracer may not open /proc/PID/mem of an undumpable process: the
    injection fails, is logged with the reason, and (fail-open) the program runs without it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    xonly = pub / "xonly"
    shutil.copy(programs.rprobe, xonly)
    xonly.chmod(0o111)
    run = launch.run([*preload(programs), "--", "env", "-i", str(xonly)], user="nobody")
    assert_clean_end(run)
    (probe,) = probes(run.stdout)
    assert probe["marker"] == "0" and probe["uid"] == "65534"
    failed = [e for e in run.of("exec") if e["decision"] == "failed"]
    assert len(failed) == 1, run.describe()
    assert "Permission denied" in failed[0]["reason"]
    assert failed[0]["action"] == "runs without the preload"
    assert failed[0]["level"] == "warning"


def test_image_removed_while_stopped_at_its_exec_event(programs: Programs, pub: Path) -> None:
    """The program's file deleted while it stops at its exec event: it still gets the preload."""
    copy = pub / "vanishing"
    shutil.copy(programs.rprobe, copy)
    with procs.fifo(pub) as fifo, event_tree(programs, pub, "exec", fifo, str(copy)) as tree:
        tree.tracer_ready()
        victim = read_pid(pub / "pid")
        tree.freeze()
        procs.release(fifo)
        procs.wait_for(
            "the exec stop",
            lambda: procs.stopped([victim]) and os.readlink(f"/proc/{victim}/exe") == str(copy),
            10,
        )
        copy.unlink()
        tree.thaw()
        run = tree.wait(60)
    assert_clean_end(run)
    (probe,) = probes(run.stdout)
    assert probe["marker"] == "1"
    (ev,) = run.execs(" (deleted)")
    assert ev["decision"] in ("present", "injected"), ev


def _big_env(n: int, size: int) -> list[str]:
    return [a for i in range(n) for a in ("--force-env", f"VGPU_TEST_BIG{i}={'z' * size}")]


def test_new_stack_cannot_be_written(programs: Programs, pub: Path) -> None:
    """/proc/PID/mem grows the tracee's stack on a write below it (Linux >= 6.5 does it in
    __access_remote_vm), up to the *tracer's* RLIMIT_STACK. Once CMD runs, vgpu-launch's own
    soft limit is lowered to 512 KiB; a program then exec'd with an empty environment needs
    600 KiB of new variables (5 x 120 KiB --force-env): the write fails with EIO. The decision
    is "failed" with that reason and, fail-open, the program runs without the preload."""
    import resource

    with (
        procs.fifo(pub) as fifo,
        event_tree(
            programs,
            pub,
            "exec",
            fifo,
            programs.rtool,
            "rlimit-exec",
            str(8 << 20),
            programs.rprobe,
            "--touch",
            str(pub / "ran"),
            extra=tuple(_big_env(5, 120_000)),
        ) as tree,
    ):
        tree.tracer_ready()
        read_pid(pub / "pid")
        resource.prlimit(tree.launcher, resource.RLIMIT_STACK, (512 * 1024, resource.RLIM_INFINITY))
        procs.release(fifo)
        run = tree.wait(60)
    assert_clean_end(run)
    (ev,) = run.execs("/rprobe")
    assert ev["decision"] == "failed", ev
    assert "Input/output error" in ev["reason"]
    (probe,) = probes(run.stdout)
    assert probe["marker"] == "0" and probe["LD_PRELOAD"] == "(unset)"
    assert (pub / "ran").exists()


def test_new_environment_beyond_the_programs_own_stack_limit(programs: Programs) -> None:
    """A new environment larger than the program's stack limit: no crash, either way."""
    run = launch.run(
        [
            *preload(programs),
            *_big_env(2, 100_000),
            "--",
            programs.rtool,
            "reap",
            programs.rtool,
            "rlimit-exec",
            "163840",
            programs.rprobe,
        ]
    )
    assert_clean_end(run)
    # Either injected and running, or failed and running without it: never a crash.
    assert launch.reap_status(run.stdout) == 0, run.describe()


# ---- setuid, 32-bit ----------------------------------------------------------------------------


@pytest.fixture
def setuid_probe(programs: Programs, pub: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a setuid-root program")
    target = pub / "suid-probe"
    shutil.copy(programs.rprobe, target)
    os.chown(target, 0, 0)
    target.chmod(0o4755)
    return target


def test_setuid_program_run_by_an_unprivileged_user(programs: Programs, setuid_probe: Path) -> None:
    """Root's tracer, a tree that switched to nobody, a setuid-root program: the kernel honours
    the setuid bit (the tracer is privileged), AT_SECURE is 1, and the program is left alone
    (decision setuid): ld.so would ignore the preload, and giving it one is not ours to do."""
    run = launch.run([*preload(programs), "--", *launch.NOBODY, str(setuid_probe)])
    assert_clean_end(run)
    (probe,) = probes(run.stdout)
    assert (probe["uid"], probe["euid"], probe["secure"]) == ("65534", "0", "1")
    assert probe["marker"] == "0"
    (ev,) = run.execs("/suid-probe")
    assert ev["decision"] == "setuid"
    assert run.end["counts"]["setuid"] == 1


def test_setuid_program_under_an_unprivileged_tracer(
    programs: Programs, setuid_probe: Path
) -> None:
    """vgpu-launch itself as nobody: the kernel runs the setuid program *without* its privilege
    (a tracer may not gain it), but still with AT_SECURE=1; decision setuid, no preload."""
    run = launch.run([*preload(programs), "--", str(setuid_probe)], user="nobody")
    assert_clean_end(run)
    (probe,) = probes(run.stdout)
    assert (probe["uid"], probe["euid"], probe["secure"]) == ("65534", "65534", "1")
    assert run.execs("/suid-probe")[0]["decision"] == "setuid"


def test_32bit_program_with_a_64bit_only_preload(programs: Programs) -> None:
    """Injected all the same (the environment is inherited by its children, which may be
    64-bit), with a note in the decision log that ld.so will refuse the library."""
    if "rprobe32" not in programs:
        pytest.skip("gcc -m32 unavailable (gcc-multilib)")
    run = launch.run([*preload(programs), "--", "env", "-i", programs.rprobe32])
    assert_clean_end(run)
    (probe,) = probes(run.stdout)
    assert probe["bits"] == "32" and probe["marker"] == "0"
    assert probe["LD_PRELOAD"] == programs.librobustmark
    (ev,) = run.execs("/rprobe32")
    assert ev["decision"] == "injected" and ev["bits"] == 32
    assert "ld.so will refuse" in ev["note"] and programs.librobustmark in ev["note"]
    assert any("wrong ELF class" in line for line in run.lines), run.describe()


# ---- the tracer itself fails ------------------------------------------------------------------


def _fault_run(programs: Programs, pub: Path, *extra: str) -> launch.LaunchResult:
    """Fault at the 2nd exec (the first rprobe, stopped at its exec event when the tracer
    dies). Afterwards the tree runs untraced: an `env -i` program no longer gets the preload,
    a program that inherits it still has it."""
    script = (
        f"{programs.rprobe}; sleep 0.2; env -i {programs.rprobe}; {programs.rprobe}; "
        f"{programs.rtool} rlimit-exec 8388608 {programs.rprobe} --touch {pub / 'ran'}; exit 7"
    )
    return launch.run(
        [*preload(programs), *extra, "--", "sh", "-c", script],
        env={"VGPU_LAUNCH_TEST_FAULT": "exec:2"},
        pass_fds=[launch.test_hooks_fd()],
    )


def test_exception_in_the_tracer_leaves_the_tree_running(programs: Programs, pub: Path) -> None:
    """An exception in the tracer (fail-open): the tree runs on untraced, CMD's status kept."""
    run = _fault_run(programs, pub)
    assert run.returncode == 7, run.describe()
    (failed,) = run.of("tracer-failed")
    assert "FaultInjected" in failed["error"]
    assert "runs on untraced" in failed["message"]
    got = probes(run.stdout)
    assert [p["marker"] for p in got] == ["1", "0", "1", "0"], run.describe()
    assert (pub / "ran").exists()
    # After the failure nothing is traced any more: no exec is logged.
    assert len(run.of("exec")) == 1, run.describe()  # sh's: the fault came at the next one
    assert run.end["cmd_exit"] == 7


def test_fault_hook_alone_is_ignored(programs: Programs) -> None:
    """VGPU_LAUNCH_TEST_FAULT without the test suite's memfd (say, an environment copied from
    a test into a unit) changes nothing but a warning: the tracer keeps injecting."""
    script = f"{programs.rprobe}; env -i {programs.rprobe}; env -i {programs.rprobe}"
    run = launch.run(
        [*preload(programs), "--", "sh", "-c", script],
        env={"VGPU_LAUNCH_TEST_FAULT": "exec:2"},
    )
    assert run.returncode == 0, run.describe()
    assert not run.of("tracer-failed"), run.describe()
    (ignored,) = run.of("test-hook-ignored")
    assert ignored["level"] == "warning" and "VGPU_LAUNCH_TEST_FAULT" in ignored["message"]
    assert [p["marker"] for p in probes(run.stdout)] == ["1", "1", "1"], run.describe()


def test_after_a_tracer_failure_the_end_event_reports_no_tracees(
    programs: Programs, pub: Path
) -> None:
    """After a tracer failure the end event says tracer_failed and no tracees left."""
    run = _fault_run(programs, pub)
    assert run.end["tracees_left"] in (0, None), run.end
    assert run.end.get("tracer_failed") is True, run.end


def test_a_stop_of_cmd_before_the_failed_tracer_thread_ends_is_not_its_exit(
    programs: Programs,
) -> None:
    """After a tracer failure, a signal CMD takes while the tracer thread is still ending
    reaches CMD, and vgpu-launch exits like CMD, not when CMD stops for the signal."""
    # exec 2 is sleep's: the tracer fails there and its thread takes 2 s to end; until then
    # the kernel reports CMD's stops (here, taking SIGUSR1) to vgpu-launch's main thread too,
    # and one that thread collected would lose its signal.
    script = "trap 'exit 3' USR1; sleep 0.5; exit 4"
    with launch.Tree(
        [*preload(programs), "--", "sh", "-c", script],
        env={"VGPU_LAUNCH_TEST_FAULT": "exec:2,slow-exit:2000"},
        pass_fds=[launch.test_hooks_fd()],
    ) as tree:
        tree.wait_event("tracer-failed")
        (cmd,) = [e["pid"] for e in tree.log().of("exec") if e["exe"].endswith("sh")]
        os.kill(cmd, signal.SIGUSR1)
        run = tree.wait(30)
    assert run.returncode == 3, run.describe()  # the trap's exit: CMD got SIGUSR1
    assert run.end["cmd_exit"] == 3, run.end


def _sigchld_blocked(task: str) -> bool:
    blocked = procs.status_field(task, "SigBlk")
    return blocked is not None and bool(int(blocked, 16) & procs.mask_of(signal.SIGCHLD))


@pytest.mark.parametrize("tracer", ["alive", "failed"])
def test_no_thread_can_take_cmds_sigchld(programs: Programs, tracer: str) -> None:
    """Every thread of vgpu-launch blocks SIGCHLD (the main thread waits for it after a
    tracer failure): a thread that did not would discard CMD's group-wide SIGCHLD, its
    default action, and after a tracer failure vgpu-launch would wait forever for CMD's end."""
    script = f"{programs.rprobe}; env -i {programs.rprobe}; exec sleep 30"
    extra: dict[str, Any] = {}
    if tracer == "failed":  # exec 3 is sleep's: the tracer fails there, the tree runs on
        extra = {"env": {"VGPU_LAUNCH_TEST_FAULT": "exec:3"}, "pass_fds": [launch.test_hooks_fd()]}
    # debug: a program that exits before its check is a verify event too
    argv = ["--log-level", "debug", *preload(programs), "--", "sh", "-c", script]
    with launch.Tree(argv, **extra) as tree:
        # every thread there will be: the log's writer, the verifier, the request threads
        procs.wait_for("a verify event", lambda: tree.log().of("verify"), 20)
        main = str(tree.launcher)
        allowed: list[str] = []
        if tracer == "failed":
            procs.wait_for("the tracer's failure", lambda: tree.log().of("tracer-failed"), 20)
            # the main thread then waits for SIGCHLD in sigwaitinfo, and the kernel shows the
            # signals a thread waits for as unblocked meanwhile
            allowed = [f"{main}/task/{main}"]
            procs.wait_for(
                "the main thread to wait for SIGCHLD", lambda: not _sigchld_blocked(allowed[0]), 20
            )
        tasks = [f"{main}/task/{t}" for t in os.listdir(f"/proc/{main}/task")]
        assert len(tasks) >= 4, tasks
        open_to_it = [t for t in tasks if not _sigchld_blocked(t)]
        assert open_to_it == allowed, open_to_it
        os.kill(tree.launcher, signal.SIGTERM)  # forwarded: sleep ends, and so does the tree
        run = tree.wait(30)
    assert run.returncode == -signal.SIGTERM, run.describe()  # as CMD ended


# ---- vgpu-launch itself SIGKILLed -------------------------------------------------------------


def heartbeat_tree(programs: Programs, pub: Path, *extra: str) -> launch.Tree:
    return launch.Tree(
        [
            *preload(programs),
            *extra,
            "--",
            programs.rtool,
            "reap",
            programs.rtool,
            "heartbeat",
            str(pub / "beats"),
            programs.rprobe,
            "60",
        ],
    )


def _beats(pub: Path) -> list[str]:
    try:
        return (pub / "beats").read_text().splitlines()
    except FileNotFoundError:
        return []


def test_launcher_sigkilled_tree_runs_on_untouched(programs: Programs, pub: Path) -> None:
    """vgpu-launch SIGKILLed: its tree runs on, untraced, and new children still get the preload."""
    with heartbeat_tree(programs, pub) as tree:
        tree.tracer_ready()
        procs.wait_for(
            "two children", lambda: sum(b.startswith("child") for b in _beats(pub)) >= 2, 20
        )
        tree_before = set(tree.tree_pids())
        os.kill(tree.launcher, signal.SIGKILL)
        procs.wait_for("vgpu-launch to die", lambda: procs.state(tree.launcher) in (None, "Z"), 10)
        n = len(_beats(pub))
        # The tree goes on: the same processes, untraced, none stopped, still spawning.
        procs.wait_for("the tree to go on spawning", lambda: len(_beats(pub)) > n + 20, 10)
        after = _beats(pub)
        assert tree_before <= set(tree.pids()), (tree_before, tree.pids())
        assert not procs.stopped(tree.tree_pids())
        for pid in tree.tree_pids():
            assert "TracerPid:\t0\n" in Path(f"/proc/{pid}/status").read_text()
        # Children still inherit the preload (through the environment); they all exit 0.
        assert all(line == "child rc=0" for line in after if line.startswith("child"))
        # Among them children started after vgpu-launch died, which no tracer gave it to:
        # `rprobe --check` exits 0 only with LD_PRELOAD set and librobustmark.so mapped (else 3).
        since = [line for line in after[n:] if line.startswith("child")]
        assert since, after[n:]
        assert all(line == "child rc=0" for line in since), since
        hb = [p for p in tree.tree_pids() if "heartbeat" in Path(f"/proc/{p}/cmdline").read_text()]
        for pid in hb:
            os.kill(pid, signal.SIGTERM)
        run = tree.wait(30)
    assert run.returncode == -signal.SIGKILL
