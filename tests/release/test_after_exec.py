"""release_after_exec: a program whose path and arguments match is injected at its exec, then
given back before its first instruction; its threads and signals are no longer stopped, and
the programs it starts are no longer followed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from relsupport import (
    SHELL_LOOP,
    Built,
    build,
    events,
    launcher_argv,
    run_env,
    tracer,
    tree,
    wait_for,
)


@pytest.fixture(scope="module")
def built() -> Built:
    return build()


def test_matching_program_runs_untraced_with_its_preload(built: Built) -> None:
    """The matching program has TracerPid 0 from its exec on, and the preload in its
    environment and mapped; a child it starts with an empty environment is not followed."""
    pattern = f"{built.rel_probe} --wait *"
    with tree(["--preload", built.librelmarker_so, "--release-after-exec", pattern, "--",
               *SHELL_LOOP]) as t:
        go = Path(t.dir) / "go"
        t.send(f"env -i {built.rel_probe} --wait {go} --child {built.rel_probe} "
               f">{t.dir}/probe.out &")
        out = Path(t.dir) / "probe.out"
        first = wait_for(lambda: out.exists() and out.read_text().strip(), "the probe")
        pid = int(first.split("pid=")[1].split()[0])
        assert "tracer=0" in first, first  # read by the program itself, after its exec
        assert f"preload={built.librelmarker_so}" in first and "marker=1" in first, first
        assert tracer(pid) == 0
        (ex,) = [e for e in t.events("exec") if e["pid"] == pid and e["exe"] == built.rel_probe]
        assert ex["decision"] == "injected"
        ev = t.wait_event("released", pid=pid)
        assert ev["reason"] == "release_after_exec" and ev["by"] == {"pattern": pattern}, ev

        go.touch()
        lines = wait_for(lambda: len(out.read_text().splitlines()) == 2 and
                         out.read_text().splitlines(), "the probe's child")
        child = lines[1]
        assert "tracer=0 preload=(unset) marker=0" in child, child
        # the shell loop, which did not match, is still traced and still injects
        t.send(f"env -i {built.rel_probe} >{t.dir}/traced.out")
        traced = Path(t.dir) / "traced.out"
        line = wait_for(lambda: traced.exists() and traced.read_text().strip(), "a probe")
        assert "tracer=0" not in line and "marker=1" in line, line


def test_pattern_is_matched_against_path_and_arguments(built: Built) -> None:
    """The pattern sees "EXE ARG1 ARG2..." (the resolved path, then argv[1:]): a pattern on
    the program's name alone does not match a call with arguments."""
    args = ["--preload", built.librelmarker_so, "--release-after-exec", "*/rel_probe",
            "--", "/bin/sh", "-c", f"{built.rel_probe}; {built.rel_probe} --wait /"]
    proc = subprocess.run(launcher_argv(args), capture_output=True, text=True, timeout=120,
                          env=run_env())
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("relprobe")]
    assert "tracer=0" in lines[0] and "tracer=0" not in lines[1], lines
    released = [e for e in events(proc.stderr) if e["event"] == "released"]
    assert len(released) == 1 and released[0]["by"] == {"pattern": "*/rel_probe"}


def test_strict_mode_refuses_release_after_exec(built: Built) -> None:
    """--strict with release_after_exec is refused before anything runs (exit 2)."""
    args = ["--strict", "--strict-allow-release", "--preload", built.librelmarker_so,
            "--release-after-exec", "*", "--", "/bin/true"]
    proc = subprocess.run(launcher_argv(args), capture_output=True, text=True, timeout=120,
                          env=run_env())
    assert proc.returncode == 2, proc.stderr
    assert "cannot be combined with release_after_exec" in proc.stderr, proc.stderr


def test_configuration_file_and_environment(built: Built, tmp_path: Path) -> None:
    """release_after_exec from the file (a list) and from VGPU_LAUNCH_RELEASE_AFTER_EXEC
    (patterns separated by ';', spaces kept)."""
    conf = tmp_path / "conf.toml"
    conf.write_text(f'release_after_exec = ["{built.rel_probe} *", "/nothing"]\n')
    conf.chmod(0o644)
    args = ["--config", str(conf), "--preload", built.librelmarker_so, "--",
            built.rel_probe, "--wait", "/"]
    proc = subprocess.run(launcher_argv(args), capture_output=True, text=True, timeout=120,
                          env=run_env())
    assert proc.returncode == 0 and "tracer=0" in proc.stdout, proc.stdout + proc.stderr
    env = {"VGPU_LAUNCH_RELEASE_AFTER_EXEC": f"/nothing here; {built.rel_probe} --wait *"}
    proc = subprocess.run(launcher_argv(args[2:]), capture_output=True, text=True,
                          timeout=120, env=run_env(None, env))
    assert proc.returncode == 0 and "tracer=0" in proc.stdout, proc.stdout + proc.stderr
    (start,) = [e for e in events(proc.stderr) if e["event"] == "start"]
    assert start["release_after_exec"] == ["/nothing here", f"{built.rel_probe} --wait *"]
