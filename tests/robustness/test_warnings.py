"""A warning means a real process runs without the shim: processes killed at their exec event,
programs re-executed under the same pid, and programs still starting when CMD exits are not
warned about."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import launch
from support.build import PROGRAMS_SRC, Programs

ATTEMPTS = 5  # runs of a racy shape before concluding that the race cannot be hit here


def _warnings(run: launch.LaunchResult) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("level") in ("warning", "error")]


def test_children_killed_at_their_exec_event_are_not_warnings(programs: Programs) -> None:
    """Children SIGKILLed while the tracer handles their exec event never run a single
    instruction: they are logged at debug level as `gone`, never as `failed`."""
    for _ in range(ATTEMPTS):
        run = launch.run(
            [
                "--log-level",
                "debug",
                "--preload",
                programs.librobustmark,
                "--",
                programs.execkill,
                "60",
                "3000",
                programs.rprobe,
            ]
        )
        assert run.returncode == 0, run.describe()
        assert _warnings(run) == [], run.describe()
        assert run.end["counts"]["failed"] == 0, run.describe()
        gone = [e for e in run.of("exec") if e["decision"] == "gone"]
        assert all(e["level"] == "debug" for e in gone), run.describe()
        assert len(gone) == run.end["counts"]["gone"]
        if gone:
            return
    pytest.fail(
        f"no child was killed during its exec event in {ATTEMPTS} runs: the race this "
        "test is about was not reached on this machine"
    )


def test_a_program_executing_itself_again_is_not_a_warning(programs: Programs) -> None:
    """One process executes the same file 2000 times under the same pid: each check looks at
    the exec it was made for (pid and exec number), never at a later one still in ld.so, so no
    "not mapped N ms after exec" warning; every exec is accounted for."""
    run = launch.run(["--preload", programs.librobustmark, "--", programs.reexec, "2000"])
    assert run.returncode == 0, run.describe()
    assert _warnings(run) == [], run.describe()
    verification = run.end["verification"]
    assert sum(verification.values()) == 2001, verification
    assert verification["unverified"] == 0, verification


def test_a_program_still_starting_when_cmd_exits_is_not_a_warning(
    programs: Programs, pub: Path
) -> None:
    """CMD exits while a program it started is still in its dynamic loader (one that never
    finishes: tests/programs/stuckld.c): nothing can be said about it, so it is a
    debug `skipped` verify event, not a warning."""
    # rprobe with stuckld as its ELF interpreter: linked here, since the interpreter's absolute
    # path is known only once the programs are built.
    stuck = pub / "stuck"
    subprocess.run(
        [
            "gcc",
            "-O2",
            f"-Wl,--dynamic-linker={programs.stuckld}",
            "-o",
            str(stuck),
            str(PROGRAMS_SRC / "rprobe.c"),
        ],
        check=True,
    )
    # CMD waits until the program is past its exec event (sleeping in stuckld), then exits.
    script = (
        f'{stuck} & p=$!; until [ "$(readlink /proc/$p/exe)" = {stuck} ] && '
        'grep -q "^State:.*(sleeping)" /proc/$p/status || ! kill -0 $p 2>/dev/null; do :; done; '
        "exit 0"
    )
    run = launch.run(
        ["--log-level", "debug", "--preload", programs.librobustmark, "--", "sh", "-c", script]
    )
    assert run.returncode == 0, run.describe()
    assert _warnings(run) == [], run.describe()
    (ev,) = [e for e in run.of("verify") if e["exe"] == str(stuck)]
    assert (ev["result"], ev["level"]) == ("skipped", "debug"), run.describe()
    assert run.end["verification"]["skipped"] == 1, run.describe()
