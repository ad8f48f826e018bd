"""release_after_exec: a program whose path and arguments match is injected at its exec, then
given back before its first instruction; its threads and signals are no longer stopped, and
the programs it starts are no longer followed."""

from __future__ import annotations

from pathlib import Path

from support.build import Programs
from support.launch import ShellTree, run
from support.procs import tracer_pid, wait_for


def test_matching_program_runs_untraced_with_its_preload(programs: Programs) -> None:
    """The matching program has TracerPid 0 from its exec on, and the preload in its
    environment and mapped; a child it starts with an empty environment is not followed."""
    probe = programs.rel_probe
    pattern = f"{probe} --wait *"
    with ShellTree(["--preload", programs.librelmarker, "--release-after-exec", pattern]) as t:
        go = t.dir / "go"
        t.send(f"env -i {probe} --wait {go} --child {probe} >{t.dir}/probe.out &")
        out = t.dir / "probe.out"
        first = wait_for("the probe", lambda: out.exists() and out.read_text().strip())
        pid = int(first.split("pid=")[1].split()[0])
        assert "tracer=0" in first, first  # read by the program itself, after its exec
        assert f"preload={programs.librelmarker}" in first and "marker=1" in first, first
        assert tracer_pid(pid) == 0
        (ex,) = [e for e in t.log().of("exec") if e["pid"] == pid and e["exe"] == probe]
        assert ex["decision"] == "injected"
        ev = t.wait_event("released", pid=pid)
        assert ev["reason"] == "release_after_exec" and ev["by"] == {"pattern": pattern}, ev

        go.touch()
        lines = wait_for(
            "the probe's child",
            lambda: len(out.read_text().splitlines()) == 2 and out.read_text().splitlines(),
        )
        child = lines[1]
        assert "tracer=0 preload=(unset) marker=0" in child, child
        # CMD's shell, which did not match, is still traced and still injects
        t.send(f"env -i {probe} >{t.dir}/traced.out")
        traced = t.dir / "traced.out"
        line = wait_for("a probe", lambda: traced.exists() and traced.read_text().strip())
        assert "tracer=0" not in line and "marker=1" in line, line


def test_pattern_is_matched_against_path_and_arguments(programs: Programs) -> None:
    """The pattern sees "EXE ARG1 ARG2..." (the resolved path, then argv[1:]): a pattern on
    the program's name alone does not match a call with arguments."""
    probe = programs.rel_probe
    res = run(
        [
            "--preload",
            programs.librelmarker,
            "--release-after-exec",
            "*/rel_probe",
            "--",
            "/bin/sh",
            "-c",
            f"{probe}; {probe} --wait /",
        ]
    )
    assert res.returncode == 0, res.describe()
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("relprobe")]
    assert "tracer=0" in lines[0] and "tracer=0" not in lines[1], lines
    released = res.of("released")
    assert len(released) == 1 and released[0]["by"] == {"pattern": "*/rel_probe"}


def test_strict_mode_refuses_release_after_exec(programs: Programs) -> None:
    """--strict with release_after_exec is refused before anything runs (exit 2)."""
    res = run(
        [
            "--strict",
            "--strict-allow-release",
            "--preload",
            programs.librelmarker,
            "--release-after-exec",
            "*",
            "--",
            "/bin/true",
        ]
    )
    assert res.returncode == 2, res.describe()
    assert "cannot be combined with release_after_exec" in res.stderr, res.describe()


def test_configuration_file_and_environment(programs: Programs, tmp_path: Path) -> None:
    """release_after_exec from the file (a list) and from VGPU_LAUNCH_RELEASE_AFTER_EXEC
    (patterns separated by ';', spaces kept)."""
    probe = programs.rel_probe
    conf = tmp_path / "conf.toml"
    conf.write_text(f'release_after_exec = ["{probe} *", "/nothing"]\n')
    conf.chmod(0o644)
    args = ["--config", str(conf), "--preload", programs.librelmarker, "--", probe, "--wait", "/"]
    res = run(args)
    assert res.returncode == 0 and "tracer=0" in res.stdout, res.describe()
    env = {"VGPU_LAUNCH_RELEASE_AFTER_EXEC": f"/nothing here; {probe} --wait *"}
    res = run(args[2:], env=env)
    assert res.returncode == 0 and "tracer=0" in res.stdout, res.describe()
    (start,) = res.of("start")
    assert start["release_after_exec"] == ["/nothing here", f"{probe} --wait *"]
