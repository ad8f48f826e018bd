"""`vgpu-launch release PID`: a process of a running tree is given back to the operator's
debuggers (gdb -p, py-spy dump, strace -p), whatever state it is in, while the rest of the tree
stays traced; only root and vgpu-launch's own user may ask; strict mode refuses unless allowed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from pathlib import Path

from support.build import Programs
from support.launch import SYSTEM_PYTHON, LaunchResult, ShellTree, command
from support.procs import state, threads_traced_by, tracer_pid, wait_for


def release(*args: str, user: str | None = None) -> LaunchResult:
    """``vgpu-launch release ARGS`` (as ``user``)."""
    return command(["release", *args], user=user)


def start_worker(t: ShellTree, programs: Programs, threads: int = 3, name: str = "worker") -> int:
    """A rel_worker in the background, child of CMD's shell; its pid once all its threads are
    traced."""
    t.send(f"{programs.rel_worker} {t.dir}/{name}.hb {threads} >{t.dir}/{name}.out &")
    out = t.dir / f"{name}.out"
    line = wait_for(f"{name} to start", lambda: out.exists() and out.read_text().strip())
    pid = int(line.split("pid=")[1])
    wait_for(
        f"every thread of {name} traced",
        lambda: len(threads_traced_by(pid, t.launcher)) == threads + 1,
    )
    return pid


def beats(t: ShellTree, name: str = "worker") -> int:
    text = (t.dir / f"{name}.hb").read_text().strip()
    return int(text) if text else 0


def keeps_running(t: ShellTree, name: str = "worker") -> None:
    now = beats(t, name)
    wait_for(f"{name}'s heartbeat to go on", lambda: beats(t, name) > now + 2)


def probe_child_gets_preload(t: ShellTree, programs: Programs) -> None:
    """A new program started by CMD's shell (still traced) with an empty environment."""
    t.send(f"env -i {programs.rel_probe} >>{t.dir}/probe.out")
    out = t.dir / "probe.out"
    line = wait_for("the probe", lambda: out.exists() and out.read_text().strip())
    assert "marker=1" in line and f"preload={programs.librelmarker}" in line, line
    assert "tracer=0" not in line, line


def test_gdb_attaches_to_a_released_process(tree: ShellTree, programs: Programs, gdb: str) -> None:
    """gdb -p gives a backtrace of every thread of a released process; it and the tree go on,
    and a program that another process of the tree starts afterwards still gets the preload."""
    t = tree
    pid = start_worker(t, programs)
    before = subprocess.run(
        [gdb, "-p", str(pid), "-batch", "-ex", "bt"], capture_output=True, text=True, timeout=120
    )
    assert "Operation not permitted" in before.stdout + before.stderr, before

    r = release(str(pid))
    assert r.returncode == 0, r.describe() + t.log().describe()
    assert r.stdout.startswith(f"released: {pid} (") and "4 threads" in r.stdout, r.describe()
    assert threads_traced_by(pid, t.launcher) == []

    bt = subprocess.run(
        [gdb, "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bt.returncode == 0, bt
    assert "rel_worker_main_loop" in bt.stdout, bt.stdout
    assert bt.stdout.count("rel_worker_thread_loop") == 3, bt.stdout

    keeps_running(t)
    probe_child_gets_preload(t, programs)
    ev = t.wait_event("released", pid=pid)
    assert ev["reason"] == "request" and ev["threads"] == 4
    assert ev["by"]["uid"] == 0 and ev["by"]["pid"] > 0
    assert "not followed" in ev["children"]
    os.kill(pid, signal.SIGKILL)
    t.send("exit")
    result = t.wait()
    assert result.returncode == 0, result.describe()
    assert result.end["released"] == 1


def test_strace_attaches_to_a_released_process(
    tree: ShellTree, programs: Programs, strace: str
) -> None:
    """strace -p traces a released process's system calls and detaches cleanly."""
    pid = start_worker(tree, programs, threads=1)
    assert release(str(pid)).returncode == 0
    trace = tree.dir / "strace.out"
    proc = subprocess.Popen(
        [strace, "-p", str(pid), "-o", str(trace)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            "strace to show the worker's sleeps",
            lambda: trace.exists() and "nanosleep" in trace.read_text(),
        )
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err  # as strace -p of any process
    assert "Operation not permitted" not in err and "detached" in err, err
    keeps_running(tree)


def test_py_spy_dumps_a_released_python_process(tree: ShellTree, py_spy: str) -> None:
    """py-spy dump (which suspends the process with ptrace) shows the stack of a released
    Python program; before the release it could not."""
    script = textwrap.dedent("""\
        import os, sys, time
        def rel_py_wait_here():
            print(f"python pid={os.getpid()}", flush=True)
            while True:
                time.sleep(0.01)
        rel_py_wait_here()
        """)
    (tree.dir / "wait.py").write_text(script)
    tree.send(f"{SYSTEM_PYTHON} {tree.dir}/wait.py >{tree.dir}/py.out &")
    out = tree.dir / "py.out"
    pid = int(wait_for("python", lambda: out.exists() and out.read_text().strip()).split("pid=")[1])
    blocked = subprocess.run(
        [py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=120
    )
    assert blocked.returncode != 0, blocked

    assert release(str(pid)).returncode == 0
    dump = subprocess.run(
        [py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=120
    )
    assert dump.returncode == 0, dump
    assert "rel_py_wait_here" in dump.stdout, dump.stdout
    assert tracer_pid(pid) == 0


def test_a_stopped_process_stays_stopped_after_its_release(
    tree: ShellTree, programs: Programs
) -> None:
    """A process stopped by job control (parked in a group-stop) is released stopped, as it
    would be without vgpu-launch, and SIGCONT resumes it."""
    pid = start_worker(tree, programs, threads=2)
    os.kill(pid, signal.SIGSTOP)
    wait_for("the worker to stop under the tracer", lambda: state(pid) == "t")
    r = release(str(pid))
    assert r.returncode == 0, r.describe()
    assert state(pid) == "T" and tracer_pid(pid) == 0
    ev = tree.wait_event("released", pid=pid)
    assert ev["stays_stopped"] is True and ev["stops"] == {"group-stop": 3}, ev
    stopped_at = beats(tree)
    os.kill(pid, signal.SIGCONT)
    wait_for("the worker to run again", lambda: beats(tree) > stopped_at + 2)


def test_tree_releases_every_descendant(tree: ShellTree, programs: Programs) -> None:
    """--tree gives back a process and everything below it; its siblings stay traced."""
    t = tree
    other = start_worker(t, programs, threads=1, name="other")
    t.send(
        f"sh -c 'echo sub pid=$$ >{t.dir}/sub.out; {programs.rel_worker} {t.dir}/a.hb 1 "
        f">/dev/null & {programs.rel_worker} {t.dir}/b.hb 1 >/dev/null & wait' &"
    )
    sub_out = t.dir / "sub.out"
    sub = int(
        wait_for("sub", lambda: sub_out.exists() and sub_out.read_text().strip()).split("pid=")[1]
    )

    def kids() -> list[int]:
        text = Path(f"/proc/{sub}/task/{sub}/children").read_text().split()
        return [int(k) for k in text] if len(text) == 2 else []

    workers = wait_for("the two workers", kids)
    for w in workers:
        wait_for("traced workers", lambda w=w: len(threads_traced_by(w, t.launcher)) == 2)
    r = release("--tree", str(sub))
    assert r.returncode == 0, r.describe()
    for p in (sub, *workers):
        assert tracer_pid(p) == 0, p
        assert f"released: {p} (" in r.stdout, r.stdout
    assert len(threads_traced_by(other, t.launcher)) == 2


def test_release_by_another_user_is_refused(tree: ShellTree, programs: Programs) -> None:
    """A user who is neither root nor vgpu-launch's user gets a refusal, which is logged; the
    process stays traced."""
    pid = start_worker(tree, programs, threads=1)
    r = release(str(pid), user="nobody")
    assert r.returncode == 1, r.describe()
    assert "refused: only root or uid 0" in r.stderr, r.describe()
    assert len(threads_traced_by(pid, tree.launcher)) == 2
    ev = tree.wait_event("release-refused")
    assert ev["by"]["uid"] == 65534 and ev["pids"] == [pid] and ev["level"] == "warning"


def test_release_by_vgpu_launchs_own_user(programs: Programs) -> None:
    """vgpu-launch run by an unprivileged user: that user may release its processes."""
    with ShellTree(["--preload", programs.librelmarker], user="nobody") as t:
        pid = start_worker(t, programs, threads=1)
        r = release(str(pid), user="nobody")
        assert r.returncode == 0, r.describe() + t.log().describe()
        assert tracer_pid(pid) == 0
        assert t.wait_event("released", pid=pid)["by"]["uid"] == 65534


def test_strict_mode_refuses_release_unless_allowed(programs: Programs) -> None:
    """--strict: release fails with a message naming --strict-allow-release, and an error is
    logged; with --strict-allow-release it works, logged as a warning."""
    with ShellTree(["--strict", "--preload", programs.librelmarker]) as t:
        pid = start_worker(t, programs, threads=1)
        r = release(str(pid))
        assert r.returncode == 1 and "--strict-allow-release" in r.stderr, r.describe()
        ev = t.wait_event("release-refused")
        assert ev["level"] == "error" and "strict" in ev["message"], ev
        assert len(threads_traced_by(pid, t.launcher)) == 2
    with ShellTree(["--strict", "--strict-allow-release", "--preload", programs.librelmarker]) as t:
        pid = start_worker(t, programs, threads=1)
        assert release(str(pid)).returncode == 0
        assert t.wait_event("released", pid=pid)["level"] == "warning"
        assert tracer_pid(pid) == 0


def test_status_shows_released_processes(tree: ShellTree, programs: Programs) -> None:
    """vgpu-launch status marks a released process as no longer traced."""
    pid = start_worker(tree, programs, threads=1)
    traced = start_worker(tree, programs, threads=1, name="traced")
    assert release(str(pid)).returncode == 0
    st = command(["status", str(tree.launcher), "--preload", programs.librelmarker])
    lines = {
        int(ln.split()[0]): ln
        for ln in st.stdout.splitlines()
        if ln.strip() and ln.split()[0].isdigit()
    }
    assert "released" in lines[pid], st.stdout
    assert "released" not in lines[traced], st.stdout


def test_release_of_a_process_that_is_not_traced() -> None:
    """A process no vgpu-launch traces: exit status 1 and a line that says so; no process: 2."""
    r = release(str(os.getpid()))
    assert r.returncode == 1 and r.stdout.startswith(f"not traced: {os.getpid()} ("), r.describe()
    r = release("999999999")
    assert r.returncode == 2 and "no process 999999999" in r.stderr, r.describe()
