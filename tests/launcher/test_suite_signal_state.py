"""The tests do not depend on how pytest itself was started. Under ``nohup`` SIGHUP is ignored,
in a shell's background job SIGINT and SIGQUIT are, and a process inherits both through fork
and exec: the tests that look at what CMD inherits from vgpu-launch would see them. The suite
resets them for every process it starts (support.procs.reset_inherited_signal_state, called
from tests/conftest.py); this runs those tests in a pytest started that way."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from support import REPO

# The tests that see an inherited disposition or mask (CMD's SigIgn/SigBlk, bash's job control).
SUBSET = [
    "tests/launcher/test_env.py::test_inherited_ignored_and_blocked_signals_reach_a_grandchild",
    "tests/launcher/test_env.py::test_nothing_python_sets_for_itself_leaks",
    "tests/launcher/test_env.py::test_sigchld_ignored_at_start_reaches_cmd_python_m",
    "tests/launcher/test_jobcontrol.py::test_bash_m_under_vgpu_launch_has_job_control",
]


def _as_a_background_job() -> None:
    # What sh does for `cmd &` without job control; nohup adds SIGHUP. A blocked signal is
    # inherited the same way.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})


def test_suite_passes_under_nohup_in_the_background(tmp_path: Path) -> None:
    """Under `nohup ... &` (SIGHUP, SIGINT, SIGQUIT ignored) the signal-state tests pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [
            "nohup",
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'inner'}",
            *SUBSET,
        ],
        cwd=REPO,
        env=env,
        preexec_fn=_as_a_background_job,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"\b5 passed\b", out) and " failed" not in out, out[-6000:]
