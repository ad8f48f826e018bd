"""vgpu-launch leaves the way CMD did: every exit code, death by every fatal signal (seen by the
parent as WIFSIGNALED with that signal, and no core file of vgpu-launch's own), and its own
failures with the shell's codes. What systemd looks at (the main PID's wait status) is checked
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
import test_launcher_common
from test_launcher_common import (
    Bin,
    launch_argv,
    launch_env,
    parse_sig,
    started,
    wait_for,
)

lbin = test_launcher_common.lbin  # the session fixture

FATAL = [
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGILL, signal.SIGTRAP, signal.SIGABRT,
    signal.SIGBUS, signal.SIGFPE, signal.SIGKILL, signal.SIGUSR1, signal.SIGSEGV, signal.SIGUSR2,
    signal.SIGPIPE, signal.SIGALRM, signal.SIGTERM, getattr(signal, "SIGSTKFLT", 16),
    signal.SIGXCPU,
    signal.SIGXFSZ, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR, signal.SIGSYS,
    signal.SIGRTMIN, signal.SIGRTMIN + 1, signal.SIGRTMAX - 1, signal.SIGRTMAX,
]


def _core_unlimited() -> None:
    # CMD (die) turns dumps off for itself: a core file can only be vgpu-launch's.
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _statuses(argvs: Sequence[list[str]], cwd: Path, parallel: int = 4,
              timeout: float = 120) -> list[tuple[int, bytes]]:
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
                    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err, env=launch_env(), cwd=cwd,
                                         preexec_fn=_core_unlimited, start_new_session=True)
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


def test_every_exit_code_passes_through(lbin: Bin, tmp_path: Path) -> None:
    codes = list(range(256))
    out = _statuses([launch_argv(lbin.lib, lbin.die, "exit", str(n)) for n in codes], tmp_path)
    got = {n: (os.WEXITSTATUS(st) if os.WIFEXITED(st) else f"signal {os.WTERMSIG(st)}")
           for n, (st, _o) in zip(codes, out, strict=True)}
    wrong = {n: g for n, g in got.items() if g != n}
    assert not wrong, "\n".join(f"exit {n}: got {g}\n" + _tail(tmp_path / f"stderr-{n}")
                                for n, g in wrong.items())
    assert all(o == b"" for _s, o in out), "vgpu-launch wrote to stdout"


def test_every_fatal_signal_kills_vgpu_launch_the_same_way(lbin: Bin, tmp_path: Path) -> None:
    out = _statuses([launch_argv(lbin.lib, lbin.die, "signal", str(int(s))) for s in FATAL],
                    tmp_path)
    seen = {}
    for i, (sig, (status, _o)) in enumerate(zip(FATAL, out, strict=True)):
        assert os.WIFSIGNALED(status), (f"{sig!r}: exited {os.WEXITSTATUS(status)}\n"
                                        + _tail(tmp_path / f"stderr-{i}"))
        seen[int(sig)] = (os.WTERMSIG(status), os.WCOREDUMP(status))
    assert seen == {int(s): (int(s), False) for s in FATAL}
    cores = [p.name for p in tmp_path.iterdir() if p.name.startswith("core")]
    assert cores == [], "vgpu-launch dumped core"


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(x for x in lines[-30:] if '"event":"exec"' not in x)


def test_fatal_signal_through_python_m(lbin: Bin, tmp_path: Path) -> None:
    """The same through ``python -m vgpu_launch`` (no wrapper script)."""
    out = _statuses([launch_argv(lbin.lib, lbin.die, "signal", "15", module=True),
                     launch_argv(lbin.lib, lbin.die, "exit", "1", module=True)], tmp_path)
    (term, _o1), (one, _o2) = out
    assert os.WIFSIGNALED(term) and os.WTERMSIG(term) == signal.SIGTERM
    assert os.WIFEXITED(one) and os.WEXITSTATUS(one) == 1


# -- what systemd looks at ----------------------------------------------------------------------


def test_systemd_results_from_the_main_pid_status(lbin: Bin, tmp_path: Path) -> None:
    """systemd: a main process killed by SIGTERM is a clean stop (Result=success), exit status 1
    a failure, exit 143 a failure too. The wait status must be CMD's own, not 128+N."""
    out = _statuses([
        launch_argv(lbin.lib, "/bin/sh", "-c", "kill -TERM $$"),
        launch_argv(lbin.lib, "/bin/sh", "-c", "exit 1"),
        launch_argv(lbin.lib, "/bin/sh", "-c", "exit 143"),
    ], tmp_path)
    (killed, _a), (failed, _b), (exit143, _c) = out
    assert os.WIFSIGNALED(killed) and os.WTERMSIG(killed) == signal.SIGTERM
    assert os.WIFEXITED(failed) and os.WEXITSTATUS(failed) == 1
    assert os.WIFEXITED(exit143) and os.WEXITSTATUS(exit143) == 143


@pytest.mark.parametrize("handles_term", [False, True], ids=["default-action", "handler"])
def test_systemctl_stop_sigterm_to_main_pid(lbin: Bin, tmp_path: Path, handles_term: bool) -> None:
    """`systemctl stop` (KillMode=mixed): SIGTERM to the main PID only. CMD sees it once and
    vgpu-launch ends as CMD does: killed by SIGTERM (clean stop), or CMD's exit code."""
    cmd: list[str | os.PathLike[str]] = [lbin.sigrec, "-n", "-e" if handles_term else "-d",
                                         "15"]
    with started(launch_argv(lbin.lib, *cmd), tmp_path) as run:
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


# -- vgpu-launch's own failures -----------------------------------------------------------------


def _run(argv: list[str], cwd: Path, **env: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=launch_env(**env), cwd=cwd,
                          timeout=60, stdin=subprocess.DEVNULL)


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if not x.startswith("{")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_usage_error_is_2(lbin: Bin, tmp_path: Path) -> None:
    r = _run([*launch_argv(lbin.lib, "true")[:1], "--no-such-option", "--", "true"], tmp_path)
    assert r.returncode == 2
    assert _one_line(r.stderr).startswith("vgpu-launch: ")
    r = _run([*launch_argv(lbin.lib, "true")[:1], "--preload", str(lbin.lib)], tmp_path)
    assert r.returncode == 2 and "no command" in _one_line(r.stderr)


def test_not_found_is_127(lbin: Bin, tmp_path: Path) -> None:
    r = _run(launch_argv(lbin.lib, "no-such-command-xyz"), tmp_path)
    assert r.returncode == 127
    line = _one_line(r.stderr)
    assert "no-such-command-xyz" in line and "not found" in line
    r = _run(launch_argv(lbin.lib, tmp_path / "missing"), tmp_path)
    assert r.returncode == 127 and str(tmp_path / "missing") in _one_line(r.stderr)
    assert r.stdout == ""


def test_not_executable_is_126(lbin: Bin, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("echo hi\n")
    plain.chmod(0o644)
    for target in (plain, tmp_path):
        r = _run(launch_argv(lbin.lib, target), tmp_path)
        assert r.returncode == 126, r.stderr
        line = _one_line(r.stderr)
        assert str(target) in line, line
    if os.geteuid() != 0:  # root may read anything; a mode-000 file is still not executable
        return
    r = _run(launch_argv(lbin.lib, plain), tmp_path)
    assert r.returncode == 126


def test_script_without_interpreter_line_runs_with_sh(lbin: Bin, tmp_path: Path) -> None:
    """execvp(3) and the shell run an executable file the kernel refuses (ENOEXEC) with
    /bin/sh."""
    script = tmp_path / "script"
    script.write_text("echo from-script \"$1\"\nexit 7\n")
    script.chmod(0o755)
    r = _run(launch_argv(lbin.lib, script, "arg"), tmp_path)
    assert (r.returncode, r.stdout) == (7, "from-script arg\n"), r.stderr


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_stdout_holds_only_cmds_output(lbin: Bin, tmp_path: Path, log_format: str) -> None:
    argv = launch_argv(lbin.lib, "/bin/sh", "-c", "echo out; echo err >&2; /bin/true")
    argv[argv.index("json")] = log_format
    r = _run(argv, tmp_path)
    assert r.returncode == 0
    assert r.stdout == "out\n"
    assert "err" in r.stderr
    assert '"event"' in r.stderr or log_format == "console"


def test_cmd_exits_with_a_child_still_running(lbin: Bin, tmp_path: Path) -> None:
    """vgpu-launch exits at once with CMD's status; the descendant goes on running (not
    stopped, not killed) and still takes its own signals."""
    out = tmp_path / "child.out"
    script = f'{lbin.sigrec} -n -e 10 > {out} 2>&1 & echo "$!" > {tmp_path}/child.pid; exit 5'
    with started(launch_argv(lbin.lib, "/bin/sh", "-c", script), tmp_path) as run:
        status = run.wait_status(timeout=20)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 5, run.stderr()
        child = int(wait_for("the child's pid", lambda: (tmp_path / "child.pid").read_text()
                             if (tmp_path / "child.pid").exists() else "").strip())
        try:
            wait_for("the child to be ready", lambda: out.exists() and "ready" in out.read_text())
            st = wait_for("the child's state", lambda: _state_of(child))
            assert st in ("S", "R"), f"descendant left in state {st}"
            assert _tracer_of(child) == "0", "descendant still traced"
            os.kill(child, signal.SIGUSR1)
            wait_for("the child to take SIGUSR1", lambda: "done" in out.read_text())
            assert "sig=10 " in out.read_text()
        finally:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)


def _state_of(pid: int) -> str:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    return data[data.rindex(b")") + 2 :].split()[0].decode()


def _tracer_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return line.split()[1]
    return "?"
