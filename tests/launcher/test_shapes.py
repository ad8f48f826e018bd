"""One test per process shape: does the preload reach the leaf program, and does the log say so?

Each test runs a tree of small programs (tests/programs) under vgpu-launch with ``libmarker.so``
as the preload and ``VGPU_TEST_DEVICES=2`` as a configured variable, and checks what a user would
check: the leaf ``probe`` prints ``LD_PRELOAD`` naming the preload and ``marker=1`` (the library is
mapped), the library's constructor wrote ``[marker] loaded`` for that process, and the launcher's
log has an exec event for it with the expected decision.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from support.build import Programs
from support.launch import LaunchResult, preload_entries, run

DEVICES = "2"


def launch(preload: Path | str, cmd: list[Any], *, env_opt: bool = True, **kw: Any) -> LaunchResult:
    opts: list[Any] = ["--preload", preload]
    if env_opt:
        opts += ["--env", f"VGPU_TEST_DEVICES={DEVICES}"]
    return run([*opts, "--", *cmd], **kw)


def marker_lines(
    res: LaunchResult, pid: int | None = None, exe: Path | str | None = None, tag: str = "marker"
) -> list[str]:
    """The '[marker] loaded pid=N exe=X' lines, of one process and/or one program."""
    found = []
    for ln in res.lines:
        m = re.match(rf"\[{tag}\] loaded pid=(\d+) exe=(.*)$", ln)
        if not m:
            continue
        if pid is not None and int(m[1]) != pid:
            continue
        if exe is not None and m[2] != os.path.realpath(exe):
            continue
        found.append(ln)
    return found


def check_leaf(
    res: LaunchResult,
    leaf: Path | str,
    preload: Path | str,
    *,
    count: int = 1,
    decision: str = "injected",
    marker: int = 1,
    static: bool = False,
    devices: str | None = DEVICES,
) -> list[dict[str, Any]]:
    """The common assertions for ``count`` runs of the probe program ``leaf``."""
    assert res.returncode == 0, res.describe()
    probes = res.probes
    assert len(probes) == count, f"expected {count} probe line(s){res.describe()}"
    for p in probes:
        assert preload_entries(p["preload"]).count(str(preload)) == 1, (
            f"LD_PRELOAD of pid {p['pid']} is {p['preload']!r}{res.describe()}"
        )
        if devices is not None:
            assert p["devices"] == devices, res.describe()
        assert p["marker"] == marker, f"pid {p['pid']}: marker={p['marker']}{res.describe()}"
        loaded = marker_lines(res, p["pid"], leaf)
        if marker:
            assert len(loaded) == 1, (
                f"expected one '[marker] loaded pid={p['pid']} exe={leaf}'{res.describe()}"
            )
        else:
            assert loaded == [], loaded
        evs = res.exec_events(exe=leaf, pid=p["pid"])
        assert evs, f"no exec event for pid {p['pid']} ({leaf}){res.describe()}"
        ev = evs[-1]
        assert ev.get("decision") == decision, f"{ev}{res.describe()}"
        assert bool(ev.get("static")) is static, ev
        if decision in ("injected", "merged", "present"):
            assert preload_entries(ev.get("preload_after") or "").count(str(preload)) == 1, ev
    return probes


# ---------------------------------------------------------------------------------------------
# shapes


def test_env_i(programs: Programs) -> None:
    """CMD is `env -i probe`: the probe, started with an empty environment, gets the preload."""
    res = launch(programs.libmarker, ["env", "-i", programs.probe])
    check_leaf(res, programs.probe, programs.libmarker)


def test_fork_execve_empty_env(programs: Programs) -> None:
    """fork() then execve() with an empty environment: the child gets the preload."""
    cmd = [programs.spawn, "fork-exec", "--", programs.probe]
    res = launch(programs.libmarker, cmd)
    check_leaf(res, programs.probe, programs.libmarker)


def test_vfork_execve_empty_env(programs: Programs) -> None:
    """vfork() then execve() with an empty environment: the child gets the preload."""
    res = launch(programs.libmarker, [programs.spawn, "vfork", "--", programs.probe])
    check_leaf(res, programs.probe, programs.libmarker)


def test_posix_spawn_from_8_threads_at_once(programs: Programs) -> None:
    """posix_spawn() from 8 threads at once: each of the 8 children gets the preload."""
    res = launch(
        programs.libmarker,
        [programs.spawn, "posix-spawn-threads", "8", "--", programs.probe],
    )
    probes = check_leaf(res, programs.probe, programs.libmarker, count=8)
    assert len({p["pid"] for p in probes}) == 8


def test_execve_from_non_leader_thread(programs: Programs) -> None:
    """execve() from a thread other than the leader: the new program gets the preload."""
    res = launch(programs.libmarker, [programs.spawn, "nonleader-exec", "--", programs.probe])
    (probe,) = check_leaf(res, programs.probe, programs.libmarker)
    # the exec is reported under the thread group leader: same pid as the spawn program had
    assert res.exec_events(exe=programs.spawn, pid=probe["pid"]), res.describe()


def test_fexecve(programs: Programs) -> None:
    """fexecve() (an exec by file descriptor): the program gets the preload."""
    res = launch(programs.libmarker, [programs.spawn, "fexecve", "--", programs.probe])
    (probe,) = check_leaf(res, programs.probe, programs.libmarker)
    assert res.exec_events(exe=programs.spawn, pid=probe["pid"]), res.describe()


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_shebang_script_with_empty_env(programs: Programs, tmp_path: Path) -> None:
    """A `#!probe` script started with an empty environment: its interpreter gets the preload."""
    # '#!probe': the kernel runs the interpreter, which is the only exec stop
    script = _script(tmp_path / "direct.sh", f"#!{programs.probe}\n")
    res = launch(programs.libmarker, [programs.spawn, "fork-exec", "--", script])
    check_leaf(res, programs.probe, programs.libmarker)


def test_shell_script_with_empty_env(programs: Programs, tmp_path: Path) -> None:
    """A `#!/bin/sh` script with an empty environment: sh gets it, the probe inherits it."""
    # '#!/bin/sh' started with an empty environment: the shell gets the preload, the probe it
    # runs inherits it from the shell
    script = _script(tmp_path / "run-probe.sh", f"#!/bin/sh\nexec {programs.probe}\n")
    res = launch(programs.libmarker, [programs.spawn, "fork-exec", "--", script])
    (probe,) = check_leaf(res, programs.probe, programs.libmarker, decision="present")
    (sh,) = res.exec_events(exe="/bin/sh", pid=probe["pid"])
    assert sh["decision"] == "injected", sh
    assert len(marker_lines(res, probe["pid"], "/bin/sh")) == 1, res.describe()


def test_static_parent_spawning_dynamic_child(programs: Programs) -> None:
    """A static program between two dynamic ones: the dynamic child still gets the preload."""
    # spawn -(empty env)-> spawn-static -(empty env)-> probe
    res = launch(
        programs.libmarker,
        [
            programs.spawn,
            "fork-exec",
            "--",
            programs.spawn_static,
            "fork-exec",
            "--",
            programs.probe,
        ],
    )
    (probe,) = check_leaf(res, programs.probe, programs.libmarker)
    (parent,) = res.exec_events(exe=programs.spawn_static)
    assert parent.get("static") is True, parent
    assert parent.get("decision") == "injected", parent
    assert parent["pid"] != probe["pid"]
    assert marker_lines(res, exe=programs.spawn_static) == [], "a static program loaded it?"


def test_static_leaf_gets_env_but_cannot_load(programs: Programs) -> None:
    """A static leaf gets LD_PRELOAD in its environment (it has no ld.so to load it)."""
    # a static program has no ld.so: the variable is there, the library cannot be
    res = launch(programs.libmarker, [programs.spawn, "fork-exec", "--", programs.probe_static])
    check_leaf(res, programs.probe_static, programs.libmarker, marker=0, static=True)


def test_32bit_program_with_lib_token_preload(programs: Programs) -> None:
    """A 32-bit program with a `$LIB` preload: the token arrives unexpanded and loads."""
    token = programs.libmarker_lib_token  # <dir>/$LIB/libmarker.so, expanded by ld.so
    res = launch(token, [programs.spawn, "fork-exec", "--", programs.probe32])
    (probe,) = check_leaf(res, programs.probe32, token)
    assert "$LIB" in probe["preload"], "the $LIB token must reach the program unexpanded"
    # the 64-bit parent loaded the 64-bit build through the same setting
    assert len(marker_lines(res, exe=programs.spawn)) == 1, res.describe()


def test_musl_program(programs: Programs) -> None:
    """A musl program started with an empty environment gets the preload."""
    res = launch(programs.libmarker, [programs.spawn, "fork-exec", "--", programs.probe_musl])
    check_leaf(res, programs.probe_musl, programs.libmarker)


def test_python_subprocess_with_empty_env(programs: Programs) -> None:
    """Python's subprocess with env={} (as ollama-like servers do): the child gets it."""
    code = (
        "import subprocess, sys; "
        f"sys.exit(subprocess.run([{str(programs.probe)!r}], env={{}}).returncode)"
    )
    res = launch(programs.libmarker, [sys.executable, "-c", code])
    check_leaf(res, programs.probe, programs.libmarker)


def test_chain_of_4_levels_that_each_strip(programs: Programs) -> None:
    """Four generations that each strip LD_PRELOAD: every one of them gets it back."""
    res = launch(programs.libmarker, [programs.chain, "4", programs.probe])
    check_leaf(res, programs.probe, programs.libmarker)
    # levels 3 .. 0 were each started without LD_PRELOAD (level 4 by the launcher, with it)
    injected = res.exec_events(exe=programs.chain, decision="injected")
    assert [ev["argv"][1] for ev in injected] == ["3", "2", "1", "0"], res.describe()
    assert len(marker_lines(res, exe=programs.chain)) == 5, res.describe()


def test_existing_preload_is_merged(programs: Programs) -> None:
    """A program with another LD_PRELOAD gets both libraries, the configured one first."""
    res = launch(
        programs.libmarker,
        ["env", "-i", f"LD_PRELOAD={programs.libother}", programs.probe],
    )
    (probe,) = check_leaf(res, programs.probe, programs.libmarker, decision="merged")
    assert preload_entries(probe["preload"]).count(str(programs.libother)) == 1, probe
    assert len(marker_lines(res, probe["pid"], programs.probe, tag="other")) == 1, res.describe()


def test_preload_already_present_is_left_alone(programs: Programs) -> None:
    """LD_PRELOAD that already names the library is left exactly as it was."""
    value = f"{programs.libother}:{programs.libmarker}"
    res = launch(
        programs.libmarker,
        ["env", "-i", f"LD_PRELOAD={value}", programs.probe],
        env_opt=False,
    )
    (probe,) = check_leaf(res, programs.probe, programs.libmarker, decision="present", devices=None)
    assert probe["preload"] == value


def test_20000_variables(programs: Programs) -> None:
    """20,000 environment variables arrive intact beside the preload."""
    n = 20000
    res = launch(programs.libmarker, [programs.manyenv, str(n), programs.probe, "--env"])
    check_leaf(res, programs.probe, programs.libmarker)
    env = res.stdout.splitlines()[1:]
    big = [e for e in env if re.fullmatch(r"V\d{5}=v{8}", e)]
    assert len(big) == n, f"{len(big)} of {n} variables arrived intact"
    assert {e.split("=", 1)[0] for e in big} == {f"V{i:05d}" for i in range(n)}
    assert [e for e in env if e.startswith("LD_PRELOAD=")] == [f"LD_PRELOAD={programs.libmarker}"]


def test_rt_signals_during_spawns_arrive_once(programs: Programs) -> None:
    """Real-time signals sent while children are spawned arrive exactly once each."""
    n = 2000
    res = launch(
        programs.libmarker,
        [programs.sigspam, str(n), "--", programs.probe],
        timeout=300,
    )
    m = re.search(
        r"^sigspam received=(\d+) expected=(\d+) duplicates=(\d+) spawns=(\d+)$", res.stdout, re.M
    )
    assert m, res.describe()
    received, expected, duplicates, spawns = map(int, m.groups())
    assert (received, expected, duplicates) == (n, n, 0), res.describe()
    assert res.returncode == 0, res.describe()
    probes = res.probes
    assert len(probes) == spawns > 1
    assert all(p["marker"] == 1 for p in probes), res.describe()
    assert len(res.exec_events(exe=programs.probe, decision="injected")) == spawns
