"""Started with stderr (or stdin, stdout) closed, vgpu-launch runs CMD with it closed too and
exits with CMD's status, whatever the log format."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from support.build import Programs
from support.launch import clean_env, launch_argv

# CMD: which of its fds 0-2 are open, then exit 7.
REPORT = (
    "for fd in 0 1 2; do if [ -e /proc/$$/fd/$fd ]; then s=open; else s=closed; fi; "
    'printf "fd%s=%s " $fd $s >> "$0"; done; exit 7'
)


def run_closed(argv: list[str], redirections: str) -> int:
    """Run ``argv`` the way a shell does with ``redirections`` (e.g. ``2>&-``); its status."""
    proc = subprocess.run(
        ["/bin/sh", "-c", f'exec "$@" {redirections}', "sh", *argv],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    return proc.returncode


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--log-format", "json", "--log-level", "error"],
        ["--log-format", "console"],
        ["--log-format", "json", "--log-level", "debug"],
    ],
    ids=["default", "json-error", "console", "json-debug"],
)
def test_stderr_closed(programs: Programs, tmp_path: Path, options: list[str]) -> None:
    """`vgpu-launch ... 2>&-`: CMD runs with fd 2 closed; vgpu-launch exits with its status."""
    out = tmp_path / "report"
    argv = launch_argv(programs.libtest, "/bin/sh", "-c", REPORT, out)
    argv.remove("--log-format")
    argv.remove("json")
    i = argv.index("--")
    argv[i:i] = options
    rc = run_closed(argv, "2>&-")
    assert out.read_text().split() == ["fd0=open", "fd1=open", "fd2=closed"]
    assert rc == 7


def test_stderr_closed_the_log_file_still_gets_every_event(
    programs: Programs, tmp_path: Path
) -> None:
    """With stderr closed, --log-file still receives the whole log, the end event included."""
    out, log = tmp_path / "report", tmp_path / "log"
    argv = launch_argv(
        programs.libtest, "/bin/sh", "-c", REPORT, out, options=["--log-file", str(log)]
    )
    rc = run_closed(argv, "2>&-")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert rc == 7
    assert out.read_text().split() == ["fd0=open", "fd1=open", "fd2=closed"]
    assert events[0]["event"] == "start"
    assert events[-1]["event"] == "end" and events[-1]["cmd_exit"] == 7


def test_every_standard_fd_closed(programs: Programs, tmp_path: Path) -> None:
    """`<&- >&- 2>&-`: CMD gets all three closed, not the pipes or files vgpu-launch opened."""
    out, log = tmp_path / "report", tmp_path / "log"
    argv = launch_argv(
        programs.libtest, "/bin/sh", "-c", REPORT, out, options=["--log-file", str(log)]
    )
    rc = run_closed(argv, "<&- >&- 2>&-")
    assert out.read_text().split() == ["fd0=closed", "fd1=closed", "fd2=closed"]
    assert rc == 7


def test_stderr_closed_cmd_killed_by_a_signal(programs: Programs) -> None:
    """CMD killed by SIGTERM with stderr closed: vgpu-launch dies of SIGTERM too."""
    rc = run_closed(launch_argv(programs.libtest, "/bin/sh", "-c", "kill -TERM $$"), "2>&-")
    assert rc == -signal.SIGTERM


def test_stderr_closed_error_keeps_its_exit_code(programs: Programs) -> None:
    """A CMD that does not exist, stderr closed: 127, as with stderr open (the message is lost,
    as any write to a closed stderr)."""
    rc = run_closed(launch_argv(programs.libtest, "/nonexistent/cmd"), "2>&-")
    assert rc == 127
