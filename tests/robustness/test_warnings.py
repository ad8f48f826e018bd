"""A warning means a real process runs without the shim: processes killed at their exec event,
programs re-executed under the same pid, and programs still starting when CMD exits are not
warned about."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from support import launch
from support.build import PROGRAMS_SRC, Programs


def _warnings(run: launch.LaunchResult) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("level") in ("warning", "error")]


def _gone_at_exec(run: launch.LaunchResult) -> list[dict[str, Any]]:
    """The exec events of processes killed at their exec event; checks what a user sees of
    them: no warning, nothing `failed`, each one a debug `gone` event, counted as such."""
    assert run.returncode == 0, run.describe()
    assert _warnings(run) == [], run.describe()
    assert run.end["counts"]["failed"] == 0, run.describe()
    gone = [e for e in run.of("exec") if e["decision"] == "gone"]
    assert all(e["level"] == "debug" for e in gone), run.describe()
    assert len(gone) == run.end["counts"]["gone"]
    return gone


def test_children_killed_at_their_exec_event_are_not_warnings(programs: Programs) -> None:
    """Children SIGKILLed by their parent as soon as they exec (some while the tracer handles
    their exec event, as the timing falls) never warn and never count as `failed`."""
    argv = ["--log-level", "debug", "--preload", programs.librobustmark, "--", programs.execkill]
    _gone_at_exec(launch.run([*argv, "60", "3000", programs.rprobe]))


def test_a_child_killed_while_the_tracer_holds_it_is_gone(programs: Programs) -> None:
    """A child SIGKILLed while the tracer holds it at its exec event (the test hook sends the
    kill there, every time) is a debug `gone` event, never a `failed` one."""
    script = f"for i in 1 2 3 4 5; do {programs.rprobe}; done; exit 0"
    run = launch.run(
        ["--log-level", "debug", "--preload", programs.librobustmark, "--", "sh", "-c", script],
        env={"VGPU_LAUNCH_TEST_FAULT": "kill-exec:2"},  # exec 1 is sh itself
        pass_fds=[launch.test_hooks_fd()],
    )
    assert "rprobe" not in run.stdout, run.describe()  # none of them ran
    assert len(_gone_at_exec(run)) == 5, run.describe()


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
