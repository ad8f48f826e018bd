"""Job control: Ctrl-C/Ctrl-Z/`fg` in a terminal, `kill -TSTP`/`-CONT`, SIGSTOP of CMD and of a
traced grandchild, `bash -m` under vgpu-launch, a terminal hang-up."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pexpect
import pytest
from support.build import Programs
from support.launch import LAUNCHER, Started, clean_env, launch_argv, started
from support.procs import parse_sig, ppid, state, wait_for
from support.sigrec import MARKER, finish, next_signal

SI_KERNEL = 0x80


def _stopped_for(pid: int, seconds: float) -> bool:
    """Whether ``pid`` is stopped ("t" or "T") and stays so for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if state(pid) not in ("t", "T"):
            return False
        time.sleep(0.005)
    return True


def _stays(pid: int, states: tuple[str, ...], seconds: float = 0.5) -> str | None:
    """Check for ``seconds`` that ``pid`` stays in one of ``states``; return the last state.
    (A negative check needs some time: nothing must happen.)"""
    deadline = time.monotonic() + seconds
    st = state(pid)
    while time.monotonic() < deadline:
        st = state(pid)
        assert st in states, f"pid {pid} went to state {st}"
        time.sleep(0.02)
    return st


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _stopped_by(run: Started, timeout: float = 20) -> int:
    """Wait (as the parent, WUNTRACED) until vgpu-launch reports a stop; the stop signal."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(run.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            assert os.WIFSTOPPED(status), f"vgpu-launch ended: {status:#x}\n{run.stderr()}"
            return os.WSTOPSIG(status)
        if time.monotonic() > deadline:
            pytest.fail(f"vgpu-launch not stopped; states: launcher {state(run.pid)}")
        time.sleep(0.005)


# -- without a terminal: kill -TSTP / -CONT --------------------------------------------------------


@pytest.mark.parametrize("threads", [0, 4], ids=["1-thread", "5-threads"])
@pytest.mark.parametrize("target", ["pid", "group"])
@pytest.mark.parametrize("less_like", [False, True], ids=["tstp-default", "tstp-like-less"])
def test_tstp_stops_both_and_cont_resumes_both(
    programs: Programs, tmp_path: Path, target: str, less_like: bool, threads: int
) -> None:
    """SIGTSTP to vgpu-launch (`kill -TSTP PID`) or to the job (`kill -TSTP %1`): CMD stops,
    then vgpu-launch stops with the same signal (the shell's view); SIGCONT resumes both and
    CMD sees SIGCONT once. The process group is not orphaned (its parent is in the session),
    else the kernel would ignore the stop signal for CMD and vgpu-launch alike."""
    sigrec: list[str | os.PathLike[str]] = [
        programs.sigrec,
        "-T",
        str(threads),
        "-t" if less_like else "-d20",
    ]
    with started(launch_argv(programs.libtest, *sigrec), tmp_path, new_session=False) as run:
        cmd = int(run.out.expect(r"^ready pid=(\d+)").group(1))

        def send(sig: int) -> None:
            if target == "pid":
                os.kill(run.pid, sig)
            else:
                os.killpg(run.pid, sig)

        send(signal.SIGTSTP)
        if less_like:
            got = next_signal(run)
            assert got["sig"] == signal.SIGTSTP
        assert _stopped_by(run) == signal.SIGTSTP
        assert state(run.pid) == "T"
        assert state(cmd) in ("t", "T")
        send(signal.SIGCONT)
        got = next_signal(run)
        assert got["sig"] == signal.SIGCONT
        wait_for("CMD to run again", lambda: state(cmd) in ("S", "R"))
        assert state(run.pid) in ("S", "R")
        extra = finish(run)
    assert extra == []


def test_sigstop_to_cmd_alone_stays_until_sigcont(programs: Programs, tmp_path: Path) -> None:
    """SIGSTOP sent to CMD: CMD stays stopped (the tracer parks it, it does not resume it)
    until a SIGCONT sent to CMD alone, which must be enough: vgpu-launch does not stop itself
    for a stop it did not get, so its tracer is there to let CMD go on."""
    with started(
        launch_argv(programs.libtest, programs.sigrec), tmp_path, new_session=False
    ) as run:
        cmd = int(run.out.expect(r"^ready pid=(\d+)").group(1))
        os.kill(cmd, signal.SIGSTOP)
        wait_for("CMD to stop", lambda: state(cmd) in ("t", "T"))
        _stays(cmd, ("t", "T"))
        assert state(run.pid) in ("S", "R")
        os.kill(cmd, signal.SIGCONT)
        got = next_signal(run)
        assert (got["sig"], got["pid"]) == (signal.SIGCONT, os.getpid())
        wait_for("CMD to run again", lambda: state(cmd) in ("S", "R"))
        extra = finish(run)
    assert extra == []


def test_sigstop_to_a_grandchild_stays_until_sigcont(programs: Programs, tmp_path: Path) -> None:
    """SIGSTOP to a traced grandchild: it stays stopped until SIGCONT, then goes on."""
    out = tmp_path / "grandchild.out"
    script = f'{programs.sigrec} -n -e 10 > {out} & echo "gc=$!"; wait'
    with started(launch_argv(programs.libtest, "/bin/sh", "-c", script), tmp_path) as run:
        gc = int(run.out.expect(r"^gc=(\d+)").group(1))
        wait_for("the grandchild to be ready", lambda: "ready" in _text(out))
        os.kill(gc, signal.SIGSTOP)
        # First a signal-delivery stop ("t"), a moment of running once the tracer passes the
        # signal on, then the group-stop, parked in PTRACE_LISTEN ("t" again): wait until it
        # has been stopped for a while, then check that it stays so.
        wait_for("the grandchild to stop", lambda: _stopped_for(gc, 0.2))
        _stays(gc, ("t", "T"))
        assert state(run.pid) in ("S", "R")
        os.kill(gc, signal.SIGCONT)
        wait_for("the grandchild to run", lambda: state(gc) in ("S", "R"))
        wait_for("SIGCONT in its record", lambda: "sig=18 " in _text(out))
        os.kill(gc, signal.SIGUSR1)
        status = run.wait_status()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, run.stderr()
    assert [ln for ln in out.read_text().splitlines() if ln.startswith("sig=")] == [
        f"sig=18 code=0 pid={os.getpid()} value=0",
        f"sig=10 code=0 pid={os.getpid()} value=0",
    ]


# -- in a terminal --------------------------------------------------------------------------------

PROMPT = "PROMPT> "


def _bash(tmp_path: Path) -> pexpect.spawn:
    env = clean_env(PS1=PROMPT, TERM="dumb", HISTFILE="/dev/null", PROMPT_COMMAND=None)
    child = pexpect.spawn(
        "/bin/bash",
        ["--norc", "--noprofile", "-i"],
        env=env,
        cwd=str(tmp_path),
        timeout=20,
        encoding="utf-8",
        codec_errors="replace",
        dimensions=(40, 200),
    )
    child.expect_exact(PROMPT)
    return child


def _close(child: pexpect.spawn, run_pid: int | None = None) -> None:
    if run_pid:
        with contextlib.suppress(OSError):
            os.killpg(run_pid, signal.SIGKILL)
    child.close(force=True)


@pytest.mark.parametrize("less_like", [False, True], ids=["tstp-default", "tstp-like-less"])
def test_terminal_ctrl_c_ctrl_z_fg(programs: Programs, tmp_path: Path, less_like: bool) -> None:
    """Under an interactive bash: Ctrl-C reaches CMD once (from the terminal, not forwarded
    again), Ctrl-Z stops the job (bash says so), `fg` resumes it with one SIGCONT."""
    child = _bash(tmp_path)
    launcher = 0
    try:
        tstp = "-t" if less_like else "-d 20"
        child.sendline(
            f"{LAUNCHER} --preload {programs.libtest} -- {programs.sigrec} {tstp} 2>{tmp_path}/err"
        )
        child.expect(r"ready pid=(\d+) pgid=(\d+)")
        cmd, pgid = int(child.match.group(1)), int(child.match.group(2))
        launcher = pgid  # bash made the job a process group, vgpu-launch its leader
        assert Path(f"/proc/{launcher}/cmdline").read_bytes().find(b"vgpu_launch") >= 0
        child.sendcontrol("c")
        child.expect(r"sig=(\d+) code=(-?\d+)")
        assert (int(child.match.group(1)), int(child.match.group(2))) == (2, SI_KERNEL)
        child.sendcontrol("z")
        if less_like:
            child.expect(r"sig=20 code=128")
        child.expect(r"Stopped")
        child.expect_exact(PROMPT)
        assert state(launcher) == "T" and state(cmd) in ("t", "T")
        child.sendline("fg")
        child.expect(r"sig=18 code=0 pid=(\d+)")
        assert int(child.match.group(1)) != launcher  # from bash, not forwarded by us
        os.kill(launcher, MARKER)
        child.expect(r"sig=(\d+)")
        assert int(child.match.group(1)) == MARKER, "a signal arrived twice"
        child.sendline("q")
        child.expect(r"done n=(\d+)")
        assert int(child.match.group(1)) == (4 if less_like else 3)
        child.expect_exact(PROMPT)
        child.sendline("echo rc=$?")  # the status of the job `fg` resumed
        child.expect(r"rc=(\d+)")
        assert child.match.group(1) == "0"
    finally:
        _close(child, launcher)


def test_terminal_background_read_stops_the_job(programs: Programs, tmp_path: Path) -> None:
    """A CMD in a background job that reads the terminal gets SIGTTIN from the kernel, as does
    vgpu-launch: the job is reported stopped for tty input; `fg` gives it the terminal."""
    child = _bash(tmp_path)
    launcher = 0
    try:
        child.sendline(f"{LAUNCHER} --preload {programs.libtest} -- /bin/cat 2>{tmp_path}/err &")
        child.expect(r"\[1\] (\d+)")
        launcher = int(child.match.group(1))
        child.expect_exact(PROMPT)
        wait_for("the job to stop", lambda: state(launcher) == "T")
        child.sendline("jobs")
        child.expect(r"Stopped")
        child.expect_exact(PROMPT)
        child.sendline("fg")
        child.expect("cat")
        child.sendline("hello-through-cat")
        child.expect(r"hello-through-cat\r?\n.*hello-through-cat")
        child.sendeof()
        child.expect_exact(PROMPT)
        child.sendline("echo rc=$?")
        child.expect(r"rc=(\d+)")
        assert child.match.group(1) == "0"
    finally:
        _close(child, launcher)


def test_bash_m_under_vgpu_launch_has_job_control(programs: Programs, tmp_path: Path) -> None:
    """An interactive bash as CMD takes the terminal for a process group of its own and runs
    jobs: Ctrl-Z stops its job, not vgpu-launch; `fg` and Ctrl-C work on that job."""
    child = _bash(tmp_path)
    launcher = 0
    try:
        child.sendline(
            f"{LAUNCHER} --preload {programs.libtest} -- /usr/bin/env PS1='INNER> ' "
            f"/bin/bash --norc --noprofile -i -m 2>&1; echo rc=$?"
        )
        child.expect_exact("INNER> ")
        assert "no job control" not in (child.before or "")
        assert "cannot set terminal process group" not in (child.before or "")
        child.sendline("echo inner=$$ pgid=$(ps -o pgid= $$) tpgid=$(ps -o tpgid= $$)")
        child.expect(r"inner=(\d+) pgid=\s*(\d+) tpgid=\s*(\d+)")
        inner, pgid, tpgid = (int(x) for x in child.match.groups())
        assert pgid == inner == tpgid  # its own process group, in the foreground
        launcher = ppid(inner) or 0
        child.expect_exact("INNER> ")
        child.sendline("sleep 60")
        wait_for(
            "sleep to start",
            lambda: any(
                Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
                for p in os.listdir("/proc")
                if p.isdigit() and ppid(int(p)) == inner
            ),
        )
        child.sendcontrol("z")
        child.expect(r"Stopped\s+sleep 60")
        child.expect_exact("INNER> ")
        assert state(launcher) in ("S", "R"), "vgpu-launch stopped for its CMD's job"
        child.sendline("fg")
        child.expect("sleep 60")
        child.sendcontrol("c")
        child.expect_exact("INNER> ")
        child.sendline("exit 3")
        child.expect(r"rc=(\d+)")
        assert child.match.group(1) == "3"
        child.expect_exact(PROMPT)
    finally:
        _close(child, launcher)


def test_vgpu_launch_as_session_leader_terminal(programs: Programs, tmp_path: Path) -> None:
    """vgpu-launch started on a terminal as the session leader (`setsid -c`, a container's
    PID 1 with a tty): Ctrl-C reaches CMD once; a hang-up, which the kernel sends to the
    session leader alone, is passed on to CMD (SIGHUP, then the kernel's SIGCONT)."""
    out = tmp_path / "rec.out"
    child = pexpect.spawn(
        str(LAUNCHER),
        [
            "--preload",
            str(programs.libtest),
            "--",
            "/bin/sh",
            "-c",
            f"exec {programs.sigrec} -n -e 1 > {out}",
        ],
        env=clean_env(),
        cwd=str(tmp_path),
        timeout=20,
        encoding="utf-8",
        codec_errors="replace",
    )
    try:
        wait_for("CMD to be ready", lambda: "ready" in _text(out))
        child.sendcontrol("c")
        wait_for("SIGINT", lambda: "sig=2 " in _text(out))
        launcher = child.pid
        os.close(child.child_fd)  # hang-up: the terminal goes away
        wait_for("CMD to end", lambda: "done" in _text(out))
        recs = [parse_sig(x) for x in out.read_text().splitlines() if x.startswith("sig=")]
        assert [(r["sig"], r["code"], r["pid"]) for r in recs][:2] == [
            (2, SI_KERNEL, 0),
            (1, 0, launcher),
        ]
        assert [r["sig"] for r in recs].count(2) == 1
        assert [r["sig"] for r in recs].count(1) == 1
        _pid, status = wait_for("vgpu-launch to end", lambda: _reaped(launcher))
        # CMD's status (sigrec exits 0 after the SIGHUP), and CMD went with it
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"wait status {status:#x}"
        cmd = int(parse_sig(_text(out).splitlines()[0])["pid"])
        assert state(cmd) is None, f"CMD (pid {cmd}) outlived vgpu-launch: {state(cmd)}"
    finally:
        try:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
        except OSError:
            pass


def _reaped(pid: int) -> tuple[int, int] | None:
    got = os.waitpid(pid, os.WNOHANG)
    return got if got[0] else None
