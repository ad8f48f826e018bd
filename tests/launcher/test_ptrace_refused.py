"""When vgpu-launch may not trace: exit 125 with one line that says why, whether ptrace fails or
a seccomp filter kills whoever calls it, and naming the tracer that already has CMD."""

from __future__ import annotations

import json
import subprocess

import pytest
from support.build import Programs
from support.launch import clean_env, launch_argv

PYTHON = clean_env()["VGPU_LAUNCH_PYTHON"]  # the interpreter bin/vgpu-launch runs

KILLS = "a seccomp filter kills any process that calls ptrace"
REFUSES = "a seccomp filter (e.g. a container runtime's profile) refuses ptrace"


def messages(stderr: str) -> list[str]:
    """vgpu-launch's own lines (not the JSON log)."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


@pytest.mark.parametrize(
    ("action", "why"), [("kill", KILLS), ("eperm", REFUSES)], ids=["kills", "refuses"]
)
def test_seccomp_filter_on_ptrace(programs: Programs, action: str, why: str) -> None:
    """A filter that kills ptrace callers with SIGSYS (systemd's default) gives the same clear
    exit 125 as one that refuses; CMD does not run."""
    argv = launch_argv(programs.libtest, "/bin/echo", "ran")
    proc = subprocess.run(
        [programs.seccomp_ptrace, action, *argv],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 125, proc.stderr
    assert proc.stdout == ""
    [line] = messages(proc.stderr)
    assert line.startswith(f"vgpu-launch: cannot trace /bin/echo: {why}")
    assert line.endswith("; to run it untraced use --no-follow")


def test_probe_survives_a_filter_that_kills(programs: Programs) -> None:
    """trace.probe.probe, the check `doctor` can share, answers instead of dying of SIGSYS
    under a filter that kills, and says that tracing works without one."""
    code = (
        "from vgpu_launch.trace.probe import probe; p = probe(); "
        "print(p.works, p.killed_by, p.reason, sep='|')"
    )
    killed = subprocess.run(
        [programs.seccomp_ptrace, "kill", PYTHON, "-c", code],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    free = subprocess.run(
        [PYTHON, "-c", code],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert killed.returncode == 0, killed.stderr
    works, signal_, reason = killed.stdout.strip().split("|")
    assert (works, signal_) == ("False", "31") and reason.startswith(KILLS)
    assert free.stdout.strip() == "True|0|"


def test_names_the_tracer_that_has_cmd(programs: Programs) -> None:
    """Under `strace -f` the child is strace's first: the message names strace and its pid."""
    strace = subprocess.Popen(
        ["strace", "-f", "-o", "/dev/null", *launch_argv(programs.libtest, "/bin/echo", "ran")],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = strace.communicate(timeout=60)
    assert strace.returncode == 125, err
    assert out == ""
    assert messages(err) == [
        f"vgpu-launch: cannot trace /bin/echo: CMD is already traced by pid {strace.pid} "
        "(strace): vgpu-launch runs under a tracer that follows forks (strace -f, gdb, a "
        "vgpu-launch that cannot hand ptrace requests over); to run it untraced use --no-follow"
    ]


def test_nested_in_itself(programs: Programs) -> None:
    """vgpu-launch as CMD of vgpu-launch: the outer one hands the inner one its child."""
    inner = launch_argv(programs.libtest, "/bin/echo", "ran")
    proc = subprocess.run(
        launch_argv(programs.libtest, *inner),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout == "ran\n", proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    (released,) = [e for e in events if e["event"] == "released"]
    assert released["reason"] == "ptrace-seize", released
    # the inner one traces /bin/echo, which has the preload
    (echo,) = [e for e in events if e["event"] == "exec" and e["argv"][:1] == ["/bin/echo"]]
    assert echo["preload_after"] == programs.libtest, echo


def test_nested_under_strict_is_refused(programs: Programs) -> None:
    """Under a strict outer vgpu-launch the inner one is refused, and told who holds its child."""
    inner = launch_argv(programs.libtest, "/bin/echo", "ran")
    proc = subprocess.run(
        launch_argv(programs.libtest, *inner, options=["--strict"]),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 125, proc.stderr
    [line] = messages(proc.stderr)
    assert line.startswith("vgpu-launch: cannot trace /bin/echo: CMD is already traced by pid ")
    assert "of vgpu-launch" in line and "`vgpu-launch release PID`" in line, line
