"""Strict mode (--strict, VGPU_LAUNCH_STRICT=1): fail closed, proven both ways.

- A process whose injection failed is SIGKILLed at its exec stop, before its first instruction:
  it never creates its --touch file, its parent sees it killed by SIGKILL, and the decision log
  says why ("failed", with reason and action "killed (strict)").
- --exclude with --strict is refused at start (exit 2): an excluded program would run without
  the shim, which is what strict mode exists to prevent.
- If the tracer dies (the test hook) or vgpu-launch is SIGKILLed, PTRACE_O_EXITKILL kills every
  tracee: the whole tree dies and vgpu-launch's exit status says so (death by SIGKILL).
- What strict mode does not cover (setuid programs) is pinned down here too; docs/strict-mode.md
  lists every limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from support import launch, procs
from support.build import Programs


def killed_before_running(
    run: launch.LaunchResult, exe_suffix: str, ran: Path, reason: str
) -> None:
    (ev,) = [e for e in run.execs(exe_suffix) if e["decision"] == "failed"]
    assert ev["action"] == "killed (strict)", ev
    assert ev["level"] == "warning"
    assert reason in ev["reason"], ev
    assert not ran.exists(), "the program ran"
    assert launch.reap_status(run.stdout) == signal.SIGKILL, run.describe()
    assert run.end["counts"]["failed"] == 1
    assert run.end["tracees_left"] == 0


# ---- failed injection: killed before it runs --------------------------------------------------


@pytest.mark.parametrize("how", ["--strict", "VGPU_LAUNCH_STRICT=1"])
def test_32bit_program_without_a_32bit_preload_is_killed(
    programs: Programs, pub: Path, how: str
) -> None:
    """Strict mode (option or variable): a program that cannot load the preload is killed."""
    if "rprobe32" not in programs:
        pytest.skip("gcc -m32 unavailable (gcc-multilib)")
    ran = pub / "ran"
    flag = [how] if how.startswith("--") else []
    env = {"VGPU_LAUNCH_STRICT": "1"} if not flag else {}
    run = launch.run(
        [
            *flag,
            "--preload",
            programs.librobustmark,
            "--",
            programs.rtool,
            "reap",
            programs.rprobe32,
            "--touch",
            str(ran),
        ],
        env=env,
    )
    assert run.returncode == 0, run.describe()
    assert run.of("start")[0]["strict"] is True
    killed_before_running(run, "/rprobe32", ran, "ld.so will refuse")


def test_stack_that_cannot_be_written_is_killed(programs: Programs, pub: Path) -> None:
    """As test_faults.py::test_new_stack_cannot_be_written (EIO from /proc/PID/mem)."""
    import resource

    ran = pub / "ran"
    big = [a for i in range(5) for a in ("--force-env", f"VGPU_TEST_BIG{i}={'z' * 120_000}")]
    with (
        procs.fifo(pub) as fifo,
        launch.Tree(
            [
                "--strict",
                "--preload",
                programs.librobustmark,
                *big,
                "--",
                programs.rtool,
                "reap",
                programs.rtool,
                "event",
                "exec",
                str(pub / "pid"),
                str(fifo),
                programs.rtool,
                "rlimit-exec",
                str(8 << 20),
                programs.rprobe,
                "--touch",
                str(ran),
            ],
        ) as tree,
    ):
        tree.tracer_ready()
        procs.wait_for("the victim", lambda: (pub / "pid").exists(), 10)
        resource.prlimit(tree.launcher, resource.RLIMIT_STACK, (512 * 1024, resource.RLIM_INFINITY))
        procs.release(fifo)
        run = tree.wait(60)
    assert run.returncode == 0, run.describe()
    killed_before_running(run, "/rprobe", ran, "Input/output error")


def test_execute_only_program_under_an_unprivileged_tracer_is_killed(
    programs: Programs, pub: Path
) -> None:
    """An execute-only program an unprivileged tracer cannot inject is killed first."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    xonly = pub / "xonly"
    shutil.copy(programs.rprobe, xonly)
    xonly.chmod(0o111)
    ran = pub / "ran"
    os.chmod(pub, 0o777)  # nobody must be able to create the file, were the program to run
    run = launch.run(
        [
            "--strict",
            "--preload",
            programs.librobustmark,
            "--",
            programs.rtool,
            "reap",
            str(xonly),
            "--touch",
            str(ran),
        ],
        user="nobody",
    )
    assert run.returncode == 0, run.describe()
    killed_before_running(run, "", ran, "Permission denied")


def test_cmd_itself_killed_makes_vgpu_launch_die_the_same_way(
    programs: Programs, pub: Path
) -> None:
    """CMD itself killed by strict mode: vgpu-launch dies of SIGKILL as CMD did."""
    if "rprobe32" not in programs:
        pytest.skip("gcc -m32 unavailable (gcc-multilib)")
    ran = pub / "ran"
    run = launch.run(
        [
            "--strict",
            "--preload",
            programs.librobustmark,
            "--",
            programs.rprobe32,
            "--touch",
            str(ran),
        ]
    )
    assert run.returncode == -signal.SIGKILL, run.describe()
    assert run.end["cmd_signal"] == "SIGKILL"
    assert not ran.exists()


def test_strict_lets_good_programs_run(programs: Programs, pub: Path) -> None:
    """The other side: nothing is killed when every injection works, and the exit status
    is CMD's."""
    run = launch.run(
        [
            "--strict",
            "--preload",
            programs.librobustmark,
            "--",
            "sh",
            "-c",
            f"env -i {programs.rprobe} --check && {programs.rtool} spawn-storm 4 25 "
            f"{programs.rprobe} --check && exit 7",
        ]
    )
    assert run.returncode == 7, run.describe()
    assert run.end["counts"]["failed"] == 0
    assert run.end["counts"]["injected"] >= 101


def test_setuid_program_is_not_killed_and_runs_without_the_preload(
    programs: Programs, pub: Path
) -> None:
    """A documented limit: ld.so ignores the preload in a setuid program, so strict mode can
    only log it (decision setuid); killing it would break su, sudo, ping... in the tree."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    suid = pub / "suid-probe"
    shutil.copy(programs.rprobe, suid)
    suid.chmod(0o4755)
    run = launch.run(
        ["--strict", "--preload", programs.librobustmark, "--", *launch.NOBODY, str(suid)]
    )
    assert run.returncode == 0, run.describe()
    assert "secure=1" in run.stdout and "marker=0" in run.stdout
    assert run.execs("/suid-probe")[0]["decision"] == "setuid"


# ---- --exclude with --strict ----------------------------------------------------------------


@pytest.mark.parametrize(
    "strict_from,exclude_from",
    [("cli", "cli"), ("env", "cli"), ("cli", "env"), ("file", "file"), ("cli", "file")],
)
def test_exclude_with_strict_is_refused(
    programs: Programs, tmp_path: Path, strict_from: str, exclude_from: str
) -> None:
    """--exclude with strict mode, from any source, is refused at start (exit 2)."""
    args: list[str] = ["--preload", programs.librobustmark]
    env: dict[str, str | None] = {}
    conf: list[str] = []
    for what, where in (("strict", strict_from), ("exclude", exclude_from)):
        if where == "cli":
            args += ["--strict"] if what == "strict" else ["--exclude", "nvidia-smi"]
        elif where == "env":
            env["VGPU_LAUNCH_STRICT" if what == "strict" else "VGPU_LAUNCH_EXCLUDE"] = (
                "1" if what == "strict" else "nvidia-smi"
            )
        else:
            conf.append("strict = true" if what == "strict" else 'exclude = ["nvidia-smi"]')
    if conf:
        path = tmp_path / "c.conf"
        path.write_text("\n".join(conf) + "\n")
        args += ["--config", str(path)]
    ran = tmp_path / "ran"
    run = launch.run([*args, "--", programs.rprobe, "--touch", str(ran)], env=env, log_format="")
    assert run.returncode == 2, run.describe()
    (line,) = run.stderr.splitlines()
    assert "strict mode" in line and "exclude" in line, line
    assert not ran.exists()


def test_exclude_without_strict_still_works(programs: Programs) -> None:
    """Without strict mode --exclude leaves the named program without the preload."""
    run = launch.run(
        [
            "--preload",
            programs.librobustmark,
            "--exclude",
            "rprobe",
            "--",
            "env",
            "-i",
            programs.rprobe,
        ]
    )
    assert run.returncode == 0, run.describe()
    assert "marker=0" in run.stdout
    assert run.execs("/rprobe")[0]["decision"] == "excluded"


# ---- the tracer dies: the tree dies with it -----------------------------------------------------


def _beats(pub: Path) -> list[str]:
    try:
        return (pub / "beats").read_text().splitlines()
    except FileNotFoundError:
        return []


def heartbeat_tree(
    programs: Programs, pub: Path, env: Mapping[str, str | None], pass_fds: Sequence[int] = ()
) -> launch.Tree:
    return launch.Tree(
        [
            "--strict",
            "--preload",
            programs.librobustmark,
            "--",
            programs.rtool,
            "reap",
            programs.rtool,
            "heartbeat",
            str(pub / "beats"),
            programs.rprobe,
            "60",
        ],
        env=env,
        pass_fds=pass_fds,
    )


def _assert_tree_died(tree: launch.Tree, pub: Path, tree_pids: list[int]) -> None:
    procs.wait_for(
        "the whole tree to die",
        lambda: not [p for p in tree_pids if procs.state(p) not in (None, "Z")],
        5,
    )
    n = len(_beats(pub))
    time.sleep(0.3)  # proving that nothing happens needs a window: a live tree beats every 20 ms
    assert len(_beats(pub)) == n, "the heartbeat went on"


def test_tracer_exception_kills_the_tree(programs: Programs, pub: Path) -> None:
    """Fault at the 4th exec (heartbeat's second child): the tracer thread dies, EXITKILL
    kills every tracee, CMD included, and vgpu-launch dies of CMD's SIGKILL."""
    with heartbeat_tree(
        programs, pub, {"VGPU_LAUNCH_TEST_FAULT": "exec:4"}, pass_fds=[launch.test_hooks_fd()]
    ) as tree:
        tree.tracer_ready()
        procs.wait_for(
            "the first child", lambda: sum(b.startswith("child") for b in _beats(pub)) >= 1, 20
        )
        run = tree.wait(30)
    assert run.returncode == -signal.SIGKILL, run.describe()
    (failed,) = run.of("tracer-failed")
    assert "PTRACE_O_EXITKILL" in failed["message"]
    assert run.end["cmd_signal"] == "SIGKILL"
    # Only the first child ran to the end; the one at the faulting exec never ran.
    assert [b for b in _beats(pub) if b.startswith("child")] == ["child rc=0"]


def test_launcher_sigkilled_kills_the_tree(programs: Programs, pub: Path) -> None:
    """Strict mode: vgpu-launch SIGKILLed takes its whole tree with it (EXITKILL)."""
    with heartbeat_tree(programs, pub, {}) as tree:
        tree.tracer_ready()
        procs.wait_for(
            "two children", lambda: sum(b.startswith("child") for b in _beats(pub)) >= 2, 20
        )
        pids = tree.tree_pids()
        assert len(pids) >= 2
        os.kill(tree.launcher, signal.SIGKILL)
        _assert_tree_died(tree, pub, pids)
        run = tree.wait(30)
    assert run.returncode == -signal.SIGKILL
