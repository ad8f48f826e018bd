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
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Artefacts, LaunchResult, RunLaunch

DEVICES = "2"


def launch(
    run_launch: RunLaunch, preload: Path | str, cmd: list[Any], *, env_opt: bool = True, **kw: Any
) -> LaunchResult:
    opts: list[Any] = ["--preload", preload]
    if env_opt:
        opts += ["--env", f"VGPU_TEST_DEVICES={DEVICES}"]
    return run_launch([*opts, "--", *cmd], **kw)


def preload_entries(value: str) -> list[str]:
    """LD_PRELOAD's entries (ld.so accepts ':' and spaces as separators)."""
    return [e for e in re.split(r"[: ]+", value) if e]


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


def plain_env(updates: dict[str, str]) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("VGPU_TEST_")
    }
    env.update(updates)
    return env


def check_leaf(
    res: LaunchResult,
    leaf: Path,
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


def test_env_i(run_launch: RunLaunch, programs: Artefacts) -> None:
    res = launch(run_launch, programs.libmarker, ["env", "-i", programs.probe])
    check_leaf(res, programs.probe, programs.libmarker)


def test_fork_execve_empty_env(run_launch: RunLaunch, programs: Artefacts) -> None:
    cmd = [programs.spawn, "fork-exec", "--", programs.probe]
    res = launch(run_launch, programs.libmarker, cmd)
    check_leaf(res, programs.probe, programs.libmarker)


def test_vfork_execve_empty_env(run_launch: RunLaunch, programs: Artefacts) -> None:
    res = launch(run_launch, programs.libmarker, [programs.spawn, "vfork", "--", programs.probe])
    check_leaf(res, programs.probe, programs.libmarker)


def test_posix_spawn_from_8_threads_at_once(run_launch: RunLaunch, programs: Artefacts) -> None:
    res = launch(
        run_launch,
        programs.libmarker,
        [programs.spawn, "posix-spawn-threads", "8", "--", programs.probe],
    )
    probes = check_leaf(res, programs.probe, programs.libmarker, count=8)
    assert len({p["pid"] for p in probes}) == 8


def test_execve_from_non_leader_thread(run_launch: RunLaunch, programs: Artefacts) -> None:
    res = launch(
        run_launch, programs.libmarker, [programs.spawn, "nonleader-exec", "--", programs.probe]
    )
    (probe,) = check_leaf(res, programs.probe, programs.libmarker)
    # the exec is reported under the thread group leader: same pid as the spawn program had
    assert res.exec_events(exe=programs.spawn, pid=probe["pid"]), res.describe()


def test_fexecve(run_launch: RunLaunch, programs: Artefacts) -> None:
    res = launch(run_launch, programs.libmarker, [programs.spawn, "fexecve", "--", programs.probe])
    (probe,) = check_leaf(res, programs.probe, programs.libmarker)
    assert res.exec_events(exe=programs.spawn, pid=probe["pid"]), res.describe()


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_shebang_script_with_empty_env(
    run_launch: RunLaunch, programs: Artefacts, tmp_path: Path
) -> None:
    # '#!probe': the kernel runs the interpreter, which is the only exec stop
    script = _script(tmp_path / "direct.sh", f"#!{programs.probe}\n")
    res = launch(run_launch, programs.libmarker, [programs.spawn, "fork-exec", "--", script])
    check_leaf(res, programs.probe, programs.libmarker)


def test_shell_script_with_empty_env(
    run_launch: RunLaunch, programs: Artefacts, tmp_path: Path
) -> None:
    # '#!/bin/sh' started with an empty environment: the shell gets the preload, the probe it
    # runs inherits it from the shell
    script = _script(tmp_path / "run-probe.sh", f"#!/bin/sh\nexec {programs.probe}\n")
    res = launch(run_launch, programs.libmarker, [programs.spawn, "fork-exec", "--", script])
    (probe,) = check_leaf(res, programs.probe, programs.libmarker, decision="present")
    (sh,) = res.exec_events(exe="/bin/sh", pid=probe["pid"])
    assert sh["decision"] == "injected", sh
    assert len(marker_lines(res, probe["pid"], "/bin/sh")) == 1, res.describe()


def test_static_parent_spawning_dynamic_child(run_launch: RunLaunch, programs: Artefacts) -> None:
    # spawn -(empty env)-> spawn-static -(empty env)-> probe
    res = launch(
        run_launch,
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


def test_static_leaf_gets_env_but_cannot_load(run_launch: RunLaunch, programs: Artefacts) -> None:
    # a static program has no ld.so: the variable is there, the library cannot be
    res = launch(
        run_launch, programs.libmarker, [programs.spawn, "fork-exec", "--", programs.probe_static]
    )
    check_leaf(res, programs.probe_static, programs.libmarker, marker=0, static=True)


def test_32bit_program_with_lib_token_preload(run_launch: RunLaunch, programs: Artefacts) -> None:
    token = programs.libmarker_lib_token  # <dir>/$LIB/libmarker.so, expanded by ld.so
    res = launch(run_launch, token, [programs.spawn, "fork-exec", "--", programs.probe32])
    (probe,) = check_leaf(res, programs.probe32, token)
    assert "$LIB" in probe["preload"], "the $LIB token must reach the program unexpanded"
    # the 64-bit parent loaded the 64-bit build through the same setting
    assert len(marker_lines(res, exe=programs.spawn)) == 1, res.describe()


def test_musl_program(run_launch: RunLaunch, programs: Artefacts) -> None:
    res = launch(
        run_launch, programs.libmarker, [programs.spawn, "fork-exec", "--", programs.probe_musl]
    )
    check_leaf(res, programs.probe_musl, programs.libmarker)


def test_python_subprocess_with_empty_env(run_launch: RunLaunch, programs: Artefacts) -> None:
    code = (
        "import subprocess, sys; "
        f"sys.exit(subprocess.run([{str(programs.probe)!r}], env={{}}).returncode)"
    )
    res = launch(run_launch, programs.libmarker, [sys.executable, "-c", code])
    check_leaf(res, programs.probe, programs.libmarker)


def test_chain_of_4_levels_that_each_strip(run_launch: RunLaunch, programs: Artefacts) -> None:
    res = launch(run_launch, programs.libmarker, [programs.chain, "4", programs.probe])
    check_leaf(res, programs.probe, programs.libmarker)
    # levels 3 .. 0 were each started without LD_PRELOAD (level 4 by the launcher, with it)
    injected = res.exec_events(exe=programs.chain, decision="injected")
    assert [ev["argv"][1] for ev in injected] == ["3", "2", "1", "0"], res.describe()
    assert len(marker_lines(res, exe=programs.chain)) == 5, res.describe()


def test_existing_preload_is_merged(run_launch: RunLaunch, programs: Artefacts) -> None:
    res = launch(
        run_launch,
        programs.libmarker,
        ["env", "-i", f"LD_PRELOAD={programs.libother}", programs.probe],
    )
    (probe,) = check_leaf(res, programs.probe, programs.libmarker, decision="merged")
    assert preload_entries(probe["preload"]).count(str(programs.libother)) == 1, probe
    assert len(marker_lines(res, probe["pid"], programs.probe, tag="other")) == 1, res.describe()


def test_preload_already_present_is_left_alone(run_launch: RunLaunch, programs: Artefacts) -> None:
    value = f"{programs.libother}:{programs.libmarker}"
    res = launch(
        run_launch,
        programs.libmarker,
        ["env", "-i", f"LD_PRELOAD={value}", programs.probe],
        env_opt=False,
    )
    (probe,) = check_leaf(res, programs.probe, programs.libmarker, decision="present", devices=None)
    assert probe["preload"] == value


def test_20000_variables(run_launch: RunLaunch, programs: Artefacts) -> None:
    n = 20000
    res = launch(
        run_launch, programs.libmarker, [programs.manyenv, str(n), programs.probe, "--env"]
    )
    check_leaf(res, programs.probe, programs.libmarker)
    env = res.stdout.splitlines()[1:]
    big = [e for e in env if re.fullmatch(r"V\d{5}=v{8}", e)]
    assert len(big) == n, f"{len(big)} of {n} variables arrived intact"
    assert {e.split("=", 1)[0] for e in big} == {f"V{i:05d}" for i in range(n)}
    assert [e for e in env if e.startswith("LD_PRELOAD=")] == [f"LD_PRELOAD={programs.libmarker}"]


def test_rt_signals_during_spawns_arrive_once(run_launch: RunLaunch, programs: Artefacts) -> None:
    n = 2000
    res = launch(
        run_launch,
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


# ---------------------------------------------------------------------------------------------
# the headline: ollama's runners lose the shim without vgpu-launch and keep it with it

RUNNER_RE = re.compile(r"^runner pid=(\d+) port=(\d+) count=(-?\d+)$", re.M)
INITIAL_RE = re.compile(r"^initial_count=(-?\d+)$", re.M)


def _runners(stderr: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[3])) for m in RUNNER_RE.finditer(stderr)]


def _initial(stderr: str) -> int | None:
    m = INITIAL_RE.search(stderr)
    return int(m[1]) if m else None


def _ollama_under_launch(
    run_launch: RunLaunch, ollama_like: Artefacts, devices: str
) -> LaunchResult:
    res = run_launch(
        [
            "--preload",
            ollama_like.shim,
            "--env",
            f"VGPU_TEST_DEVICES={devices}",
            "--",
            ollama_like.ollama,
            "serve",
            "--once",
        ]
    )
    assert res.returncode == 0, res.describe()
    runners = _runners("\n".join(res.lines))
    assert len(runners) == 4, res.describe()
    assert [c for _, c in runners] == [int(devices)] * 4, res.describe()
    assert _initial("\n".join(res.lines)) == int(devices), res.describe()
    for pid, _ in runners:
        (ev,) = [
            e
            for e in res.exec_events(pid=pid)
            if (e.get("argv") or [None, None])[1:2] == ["runner"]
        ]
        assert ev.get("decision") == "injected", ev
        assert _same(ev.get("preload_after"), ollama_like.shim), ev
        assert f"[vgpu-test-shim] cuDeviceGetCount() pid={pid} count={devices}" in res.lines
    return res


def _same(value: str | None, lib: Path) -> bool:
    return str(lib) in preload_entries(value or "")


def test_ollama_like_runners_get_the_shim(run_launch: RunLaunch, ollama_like: Artefacts) -> None:
    # without vgpu-launch: the shim is in the server only, the runners find no GPU
    plain = subprocess.run(
        [str(ollama_like.ollama), "serve", "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        env=plain_env({"LD_PRELOAD": str(ollama_like.shim), "VGPU_TEST_DEVICES": "1"}),
        check=False,
    )
    assert plain.returncode == 0, plain.stderr
    assert [c for _, c in _runners(plain.stderr)] == [0, 0, 0, 0], plain.stderr
    assert _initial(plain.stderr) == 0, plain.stderr
    assert "cuDeviceGetCount()" not in plain.stderr

    # under vgpu-launch: every runner loads the shim and finds 1
    res = _ollama_under_launch(run_launch, ollama_like, "1")
    assert len(res.exec_events(exe=ollama_like.ollama, decision="injected")) == 4, res.describe()


def test_ollama_like_configured_env_reaches_runners(
    run_launch: RunLaunch, ollama_like: Artefacts
) -> None:
    _ollama_under_launch(run_launch, ollama_like, "3")


@pytest.mark.parametrize("devices", ["0", "5"])
def test_ollama_like_fixture_without_launcher(ollama_like: Artefacts, devices: str) -> None:
    """The fixture itself: the shim, when loaded, decides the count; the runner strips it."""
    env = plain_env(
        {
            "LD_PRELOAD": str(ollama_like.shim),
            "VGPU_TEST_DEVICES": devices,
            "LD_LIBRARY_PATH": str(ollama_like.dir),
        }
    )
    port = _free_port()
    proc = subprocess.Popen(
        [str(ollama_like.ollama), "runner", "--ollama-engine", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = _get_info(port)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert body == {"count": int(devices)}, err
    assert f"cuDeviceGetCount() pid={proc.pid} count={devices}" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_info(port: int) -> Any:
    import json
    import time
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=2) as r:
                return json.load(r)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
