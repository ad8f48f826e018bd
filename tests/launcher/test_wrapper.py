"""bin/vgpu-launch picks an interpreter that has vgpu-launch's libraries, whatever python3 comes
first in PATH; where none has them it says so in one line and exits 125."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import REPO

WRAPPER = REPO / "bin" / "vgpu-launch"

# A real python3 that lacks the libraries, as a pyenv, conda or bare venv interpreter does.
FOREIGN = '#!/bin/sh\nexec /usr/bin/python3 -S "$@"\n'
# A python3 that cannot run at all.
BROKEN = '#!/bin/sh\necho "this python3 must not be used" >&2\nexit 3\n'
# Debian's python3, recording that it was the one started.
RECORDING = '#!/bin/sh\necho "$0" >>"{log}"\nexec /usr/bin/python3 "$@"\n'


def script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def checkout_copy(root: Path) -> Path:
    """A copy of bin/ and vgpu_launch/, as a fresh clone has them (no .venv); its wrapper."""
    shutil.copytree(REPO / "bin", root / "bin")
    shutil.copytree(
        REPO / "vgpu_launch", root / "vgpu_launch", ignore=shutil.ignore_patterns("__pycache__")
    )
    return root / "bin" / "vgpu-launch"


def env_with(path_first: Path | None = None, **updates: str | None) -> dict[str, str]:
    """This environment without VGPU_LAUNCH_* and LD_PRELOAD, with ``path_first`` at the
    head of PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VGPU_LAUNCH_") and k != "LD_PRELOAD"
    }
    if path_first is not None:
        env["PATH"] = f"{path_first}:{env.get('PATH', '/usr/bin:/bin')}"
    for k, v in updates.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run(
    argv: list[str | os.PathLike[str]], env: dict[str, str], **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(a) for a in argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
        **kw,
    )


@pytest.mark.parametrize("kind", ["foreign", "broken"])
def test_python3_first_in_path_without_the_libraries(
    programs: Any, tmp_path: Path, kind: str
) -> None:
    """With a python3 that lacks the libraries first in PATH, vgpu-launch still runs CMD."""
    script(tmp_path / "path" / "python3", FOREIGN if kind == "foreign" else BROKEN)
    r = run(
        [
            WRAPPER,
            "--log-format",
            "json",
            "--preload",
            programs.libmarker,
            "--",
            "/bin/sh",
            "-c",
            f"exec env -u LD_PRELOAD {programs.probe}",
        ],
        env_with(tmp_path / "path"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "marker=1" in r.stdout, r.stdout


@pytest.mark.parametrize(
    "args",
    [["--version"], ["doctor"], ["--preload", "/nonexistent.so", "--", "true"]],
    ids=["version", "doctor", "run"],
)
def test_interpreter_without_the_libraries_gives_one_line(tmp_path: Path, args: list[str]) -> None:
    """VGPU_LAUNCH_PYTHON naming a python3 without the libraries (and no other to hand over
    to): one line that names them and the commands installing them, exit status 125, --version
    too."""
    python = script(tmp_path / "python3", FOREIGN)
    r = run([WRAPPER, *args], env_with(VGPU_LAUNCH_PYTHON=str(python)))
    assert r.returncode == 125, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "apt-get install python3-ptrace python3-prctl python3-structlog" in lines[0]
    assert "-m pip install python-ptrace python-prctl structlog" in lines[0]


def test_interpreter_that_does_not_exist_gives_one_line() -> None:
    """VGPU_LAUNCH_PYTHON naming nothing: one line naming the variable, exit status 125 (127 would
    read as "CMD not found")."""
    r = run([WRAPPER, "--version"], env_with(VGPU_LAUNCH_PYTHON="/nonexistent/python3"))
    assert r.returncode == 125
    assert r.stderr.splitlines() == [
        "vgpu-launch: VGPU_LAUNCH_PYTHON=/nonexistent/python3 is not an executable file: name a "
        "python3 that has python-ptrace, python-prctl and structlog, or unset it"
    ]


def test_the_checkouts_venv_is_preferred(programs: Any, tmp_path: Path) -> None:
    """A checkout set up by scripts/setup.sh runs with its .venv, not with PATH's python3."""
    log = tmp_path / "started"
    wrapper = checkout_copy(tmp_path / "clone")
    venv_python = script(tmp_path / "clone" / ".venv" / "bin" / "python", RECORDING.format(log=log))
    script(tmp_path / "path" / "python3", BROKEN)
    r = run(
        [wrapper, "--log-format", "json", "--preload", programs.libmarker, "--", programs.probe],
        env_with(tmp_path / "path"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "marker=1" in r.stdout
    assert [os.path.normpath(p) for p in log.read_text().splitlines()] == [str(venv_python)]


def _state_of(
    argv: list[str | os.PathLike[str]],
    env: dict[str, str],
    cwd: Path,
    preexec: Callable[[], object],
) -> tuple[dict[str, str], list[str]]:
    """The environment and the SigIgn/SigBlk lines of ``cat /proc/self/status`` run as CMD."""
    code = "env -0; printf '\\n--\\n'; exec grep -E '^Sig(Ign|Blk):' /proc/self/status"
    r = run([*argv, "/bin/bash", "-c", code], env, cwd=cwd, preexec_fn=preexec)
    assert r.returncode == 0, r.stderr[-3000:]
    environ, _, sigs = r.stdout.partition("\n--\n")
    return dict(e.split("=", 1) for e in environ.split("\0") if e), sigs.splitlines()


def test_handing_over_keeps_what_cmd_inherits(programs: Any, tmp_path: Path) -> None:
    """When the preferred python3 lacks the libraries and the next one is started instead,
    CMD still gets exactly the environment and the ignored and blocked signals it would get
    without vgpu-launch."""
    wrapper = checkout_copy(tmp_path / "clone")
    script(tmp_path / "clone" / ".venv" / "bin" / "python", FOREIGN)
    script(tmp_path / "path" / "python3", FOREIGN)

    def preexec() -> None:
        for sig in (signal.SIGPIPE, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

    env = env_with(
        tmp_path / "path",
        PWD="/",
        SHLVL="4",
        OLDPWD="/tmp",
        LC_ALL=None,
        LANG=None,
        LC_CTYPE=None,
        PYTHONPATH="/for/cmd",
    )
    want_env, want_sigs = _state_of([], env, tmp_path, preexec)
    got_env, got_sigs = _state_of(
        [wrapper, "--log-format", "json", "--preload", programs.libmarker, "--"],
        env,
        tmp_path,
        preexec,
    )
    assert got_env.pop("LD_PRELOAD") == str(programs.libmarker)
    # bash sets "_" to the program it runs, which differs when it is started under a wrapper
    for e in (got_env, want_env):
        e.pop("_", None)
    assert got_env == want_env
    assert got_sigs == want_sigs
    # the set-up took: SIGHUP (1) and SIGPIPE (13) ignored
    assert any(re.fullmatch(r"SigIgn:\s*0*1001", line) for line in want_sigs), want_sigs


def test_a_packaged_copy_uses_only_its_pinned_python(tmp_path: Path) -> None:
    """The packages pin their python3 on the wrapper's "pinned=" line: a pinned interpreter
    without the libraries is reported, not replaced by PATH's python3 that has them."""
    text = WRAPPER.read_text()
    assert re.search(r"^pinned=$", text, re.M)
    pinned = script(tmp_path / "usr" / "bin" / "python3", FOREIGN)
    shutil.copytree(
        REPO / "vgpu_launch",
        tmp_path / "usr" / "vgpu_launch",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    installed = tmp_path / "usr" / "bin" / "vgpu-launch"
    installed.write_text(re.sub(r"^pinned=$", f"pinned={pinned}", text, flags=re.M))
    installed.chmod(0o755)
    script(tmp_path / "path" / "python3", '#!/bin/sh\nexec /usr/bin/python3 "$@"\n')
    r = run([installed, "--version"], env_with(tmp_path / "path"))
    assert r.returncode == 125, r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "structlog" in lines[0], r.stderr
