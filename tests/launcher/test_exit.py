"""vgpu-launch leaves the way CMD did: every exit code, death by every fatal signal (seen by the
parent as WIFSIGNALED with that signal, and no core file of vgpu-launch's own); its own failures
are test_own_failures.py's. What systemd looks at (the main PID's wait status) is checked
from the parent's side here; tests/system boots a real systemd."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from support import launch
from support.build import Programs
from support.launch import clean_env, launch_argv, started
from support.procs import parse_sig, state, status_field, wait_for

FATAL = [
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGABRT,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGKILL,
    signal.SIGUSR1,
    signal.SIGSEGV,
    signal.SIGUSR2,
    signal.SIGPIPE,
    signal.SIGALRM,
    signal.SIGTERM,
    getattr(signal, "SIGSTKFLT", 16),
    signal.SIGXCPU,
    signal.SIGXFSZ,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    signal.SIGSYS,
    signal.SIGRTMIN,
    signal.SIGRTMIN + 1,
    signal.SIGRTMAX - 1,
    signal.SIGRTMAX,
]


def _core_unlimited() -> None:
    # CMD (die) turns dumps off for itself: a core file can only be vgpu-launch's.
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _statuses(
    argvs: Sequence[list[str]], cwd: Path, parallel: int = 4, timeout: float = 120
) -> list[tuple[int, bytes]]:
    """Run each argv (a few at a time) and return (raw wait status, stdout) for each; the
    stderr of run i is in ``cwd/stderr-i``."""
    results: list[tuple[int, bytes] | None] = [None] * len(argvs)
    running: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
    todo = list(enumerate(argvs))
    deadline = time.monotonic() + timeout
    try:
        while todo or running:
            while todo and len(running) < parallel:
                i, argv = todo.pop(0)
                with open(cwd / f"stderr-{i}", "wb") as err:
                    p = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        env=clean_env(),
                        cwd=cwd,
                        preexec_fn=_core_unlimited,
                        start_new_session=True,
                    )
                running[p.pid] = (i, p)
            pid, status = os.waitpid(-1, os.WNOHANG) if running else (0, 0)
            if not pid:
                time.sleep(0.005)
            elif pid in running:
                i, p = running.pop(pid)
                assert p.stdout is not None
                results[i] = (status, p.stdout.read())
                p.stdout.close()
                p.returncode = 0  # reaped here
            if time.monotonic() > deadline:
                pytest.fail(f"{len(todo) + len(running)} runs still going after {timeout} s")
    finally:
        for _i, p in running.values():
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
    return [r for r in results if r is not None]


def test_every_exit_code_passes_through(programs: Programs, tmp_path: Path) -> None:
    """CMD's exit code, each of 0-255, is vgpu-launch's, and vgpu-launch writes no stdout."""
    codes = list(range(256))
    out = _statuses(
        [launch_argv(programs.libtest, programs.die, "exit", str(n)) for n in codes], tmp_path
    )
    got = {
        n: (os.WEXITSTATUS(st) if os.WIFEXITED(st) else f"signal {os.WTERMSIG(st)}")
        for n, (st, _o) in zip(codes, out, strict=True)
    }
    wrong = {n: g for n, g in got.items() if g != n}
    assert not wrong, "\n".join(
        f"exit {n}: got {g}\n" + _tail(tmp_path / f"stderr-{n}") for n, g in wrong.items()
    )
    assert all(o == b"" for _s, o in out), "vgpu-launch wrote to stdout"


def test_every_fatal_signal_kills_vgpu_launch_the_same_way(
    programs: Programs, tmp_path: Path
) -> None:
    """CMD killed by a signal: vgpu-launch dies of that signal too, without dumping core."""
    out = _statuses(
        [launch_argv(programs.libtest, programs.die, "signal", str(int(s))) for s in FATAL],
        tmp_path,
    )
    seen = {}
    for i, (sig, (status, _o)) in enumerate(zip(FATAL, out, strict=True)):
        assert os.WIFSIGNALED(status), f"{sig!r}: exited {os.WEXITSTATUS(status)}\n" + _tail(
            tmp_path / f"stderr-{i}"
        )
        seen[int(sig)] = (os.WTERMSIG(status), os.WCOREDUMP(status))
    assert seen == {int(s): (int(s), False) for s in FATAL}
    cores = [p.name for p in tmp_path.iterdir() if p.name.startswith("core")]
    assert cores == [], "vgpu-launch dumped core"


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(x for x in lines[-30:] if '"event":"exec"' not in x)


def test_fatal_signal_through_python_m(programs: Programs, tmp_path: Path) -> None:
    """The same through ``python -m vgpu_launch`` (no wrapper script)."""
    out = _statuses(
        [
            launch_argv(programs.libtest, programs.die, "signal", "15", module=True),
            launch_argv(programs.libtest, programs.die, "exit", "1", module=True),
        ],
        tmp_path,
    )
    (term, _o1), (one, _o2) = out
    assert os.WIFSIGNALED(term) and os.WTERMSIG(term) == signal.SIGTERM
    assert os.WIFEXITED(one) and os.WEXITSTATUS(one) == 1


# -- what systemd looks at ----------------------------------------------------------------------


def test_systemd_results_from_the_main_pid_status(programs: Programs, tmp_path: Path) -> None:
    """systemd: a main process killed by SIGTERM is a clean stop (Result=success), exit status 1
    a failure, exit 143 a failure too. The wait status must be CMD's own, not 128+N."""
    out = _statuses(
        [
            launch_argv(programs.libtest, "/bin/sh", "-c", "kill -TERM $$"),
            launch_argv(programs.libtest, "/bin/sh", "-c", "exit 1"),
            launch_argv(programs.libtest, "/bin/sh", "-c", "exit 143"),
        ],
        tmp_path,
    )
    (killed, _a), (failed, _b), (exit143, _c) = out
    assert os.WIFSIGNALED(killed) and os.WTERMSIG(killed) == signal.SIGTERM
    assert os.WIFEXITED(failed) and os.WEXITSTATUS(failed) == 1
    assert os.WIFEXITED(exit143) and os.WEXITSTATUS(exit143) == 143


@pytest.mark.parametrize("handles_term", [False, True], ids=["default-action", "handler"])
def test_systemctl_stop_sigterm_to_main_pid(
    programs: Programs, tmp_path: Path, handles_term: bool
) -> None:
    """`systemctl stop` (KillMode=mixed): SIGTERM to the main PID only. CMD sees it once and
    vgpu-launch ends as CMD does: killed by SIGTERM (clean stop), or CMD's exit code."""
    cmd: list[str | os.PathLike[str]] = [
        programs.sigrec,
        "-n",
        "-e" if handles_term else "-d",
        "15",
    ]
    with started(launch_argv(programs.libtest, *cmd), tmp_path) as run:
        run.out.expect(r"^ready ")
        os.kill(run.pid, signal.SIGTERM)
        status = run.wait_status()
        lines = run.out.rest()
    if handles_term:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, run.stderr()
        got = [parse_sig(x)["sig"] for x in lines if x.startswith("sig=")]
        assert got == [signal.SIGTERM], lines
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_stdout_holds_only_cmds_output(programs: Programs, tmp_path: Path, log_format: str) -> None:
    """CMD's stdout is all of stdout; the log goes to stderr in the format asked for."""
    r = launch.run(
        ["--preload", programs.libtest, "--", "/bin/sh", "-c", "echo out; echo err >&2; /bin/true"],
        log_format=log_format,
        cwd=tmp_path,
    )
    assert r.returncode == 0
    assert r.stdout == "out\n"
    assert "err" in r.stderr
    if log_format == "json":
        assert r.lines == ["err"], r.describe()  # every other line is a JSON event
        assert r.end["cmd_exit"] == 0, r.describe()
    else:
        assert r.events == [], r.describe()  # not one JSON line
        assert any("cmd_exit=0" in line for line in r.lines), r.describe()  # the end, as text


def test_cmd_exits_with_a_child_still_running(programs: Programs, tmp_path: Path) -> None:
    """vgpu-launch exits at once with CMD's status; the descendant goes on running (not
    stopped, not killed) and still takes its own signals."""
    out = tmp_path / "child.out"
    script = f'{programs.sigrec} -n -e 10 > {out} 2>&1 & echo "$!" > {tmp_path}/child.pid; exit 5'
    with started(launch_argv(programs.libtest, "/bin/sh", "-c", script), tmp_path) as run:
        status = run.wait_status(timeout=20)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 5, run.stderr()
        child = int(
            wait_for(
                "the child's pid",
                lambda: (
                    (tmp_path / "child.pid").read_text()
                    if (tmp_path / "child.pid").exists()
                    else ""
                ),
            ).strip()
        )
        try:
            wait_for("the child to be ready", lambda: out.exists() and "ready" in out.read_text())
            st = wait_for("the child's state", lambda: state(child))
            assert st in ("S", "R"), f"descendant left in state {st}"
            assert status_field(child, "TracerPid") == "0", "descendant still traced"
            os.kill(child, signal.SIGUSR1)
            wait_for("the child to take SIGUSR1", lambda: "done" in out.read_text())
            assert "sig=10 " in out.read_text()
        finally:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
