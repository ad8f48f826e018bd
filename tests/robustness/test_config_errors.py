"""Bad configuration: one line on stderr, exit status 2, and nothing started.

"Nothing started" is checked with CMD = ``rprobe --touch FILE``: FILE must not exist afterwards
(support.launch.run also checks that no process of the run is left).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import launch
from support.build import Programs


def refused(
    programs: Programs,
    tmp_path: Path,
    args: list[str],
    *,
    env: dict[str, str | None] | None = None,
    expect: str = "",
) -> str:
    ran = tmp_path / "ran"
    run = launch.run(
        [*args, "--", programs.rprobe, "--touch", str(ran)], env=env, timeout=30, log_format=""
    )
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.describe()
    assert len(lines) == 1 and lines[0].startswith("vgpu-launch: "), run.describe()
    assert expect in lines[0], lines[0]
    assert not ran.exists(), "CMD ran"
    assert run.stdout == ""
    return lines[0]


def write_config(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "vgpu-launch.conf"
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return str(path)


# ---- the configuration file -----------------------------------------------------------------

FILE_CASES = {
    "unknown key": ('preload = ["{lib}"]\nstrict_mode = true\n', "unknown key 'strict_mode'"),
    "unknown table": ('preload = ["{lib}"]\n[extra]\na = 1\n', "unknown key 'extra'"),
    "syntax": ('preload = ["{lib}"\n', "configuration file"),
    "preload not a list of paths": ("preload = 5\n", "preload must be a list of paths"),
    "preload list of numbers": ("preload = [1]\n", "preload must be a list of paths"),
    "empty preload path": ('preload = [""]\n', "empty path"),
    "strict not a boolean": ('preload = ["{lib}"]\nstrict = "yes"\n', "strict must be true"),
    "env not a table": ('preload = ["{lib}"]\nenv = "A=B"\n', "env must be a table"),
    "env value not a string": ('preload = ["{lib}"]\n[env]\nA = 1\n', "env.A must be"),
    "env bad name": ('preload = ["{lib}"]\n[env]\n"A-B" = "1"\n', "env.A-B must be"),
    "LD_PRELOAD through env": (
        'preload = ["{lib}"]\n[env]\nLD_PRELOAD = "/x.so"\n',
        "set LD_PRELOAD with preload",
    ),
    "log_level": ('preload = ["{lib}"]\nlog_level = "loud"\n', "log_level must be one of"),
    "log_format": ('preload = ["{lib}"]\nlog_format = "xml"\n', "log_format must be one of"),
    "exclude not paths": ('preload = ["{lib}"]\nexclude = [1]\n', "exclude must be a list"),
    "allow_insecure not a boolean": (
        'preload = ["{lib}"]\nallow_insecure = 1\n',
        "allow_insecure must be true or false",
    ),
    "preload path with a colon": ('preload = ["/a:b.so"]\n', "contains ':' or whitespace"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_configuration_file(programs: Programs, tmp_path: Path, case: str) -> None:
    """Each kind of bad configuration file is refused with one line naming the problem."""
    text, expect = FILE_CASES[case]
    path = write_config(tmp_path, text.replace("{lib}", programs.librobustmark))
    line = refused(programs, tmp_path, ["--config", path], expect=expect)
    # every message about the file starts the same way, whichever check refused it
    assert line.startswith(f"vgpu-launch: configuration file {path}: "), line


def test_configuration_file_not_utf8(programs: Programs, tmp_path: Path) -> None:
    """A configuration file that is not UTF-8 is refused, saying so."""
    path = write_config(tmp_path, b'preload = ["/lib\xff.so"]\n')
    refused(programs, tmp_path, ["--config", path], expect="not UTF-8")


def test_configuration_file_is_a_directory(programs: Programs, tmp_path: Path) -> None:
    """A directory given as the configuration file is refused, saying so."""
    d = tmp_path / "conf.d"
    d.mkdir()
    refused(programs, tmp_path, ["--config", str(d)], expect="Is a directory")


def test_configuration_file_missing(programs: Programs, tmp_path: Path) -> None:
    """A configuration file named (option or variable) but missing is refused."""
    refused(programs, tmp_path, ["--config", str(tmp_path / "nope.conf")], expect="not found")
    refused(
        programs,
        tmp_path,
        [],
        env={"VGPU_LAUNCH_CONFIG": str(tmp_path / "nope.conf")},
        expect="not found",
    )


# ---- environment variables ----------------------------------------------------------------------

ENV_CASES = {
    "unknown variable": ({"VGPU_LAUNCH_STRICTNESS": "1"}, "unknown environment variable"),
    "strict not a boolean": ({"VGPU_LAUNCH_STRICT": "maybe"}, "VGPU_LAUNCH_STRICT"),
    "allow_insecure not a boolean": (
        {"VGPU_LAUNCH_ALLOW_INSECURE": "perhaps"},
        "VGPU_LAUNCH_ALLOW_INSECURE",
    ),
    "no_follow not a boolean": ({"VGPU_LAUNCH_NO_FOLLOW": "2"}, "VGPU_LAUNCH_NO_FOLLOW"),
    "env not assignments": ({"VGPU_LAUNCH_ENV": "JUSTANAME"}, "not NAME=VALUE"),
    "force_env bad name": ({"VGPU_LAUNCH_FORCE_ENV": "1X=2"}, "not NAME=VALUE"),
    "log level": ({"VGPU_LAUNCH_LOG_LEVEL": "loud"}, "log_level must be one of"),
    "log format": ({"VGPU_LAUNCH_LOG_FORMAT": "xml"}, "log_format must be one of"),
    "empty preload": ({"VGPU_LAUNCH_PRELOAD": ""}, "nothing to guarantee"),
    "relative preload": ({"VGPU_LAUNCH_PRELOAD": "lib/librobustmark.so"}, "absolute path"),
    "missing preload": ({"VGPU_LAUNCH_PRELOAD": "/nonexistent/libx.so"}, "not found"),
}


@pytest.mark.parametrize("case", sorted(ENV_CASES))
def test_bad_environment_variable(programs: Programs, tmp_path: Path, case: str) -> None:
    """Each kind of bad VGPU_LAUNCH_* variable is refused with one line naming it."""
    env, expect = ENV_CASES[case]
    args = [] if "VGPU_LAUNCH_PRELOAD" in env else ["--preload", programs.librobustmark]
    refused(programs, tmp_path, args, env=dict(env), expect=expect)


# ---- the command line ---------------------------------------------------------------------------


def test_empty_preload(programs: Programs, tmp_path: Path) -> None:
    """An empty --preload path is refused."""
    refused(programs, tmp_path, ["--preload", ""], expect="empty path")


def test_preload_is_a_directory(programs: Programs, tmp_path: Path) -> None:
    """A directory given as the preload library is refused."""
    refused(programs, tmp_path, ["--preload", programs.dir], expect="is a directory")


def test_preload_not_an_elf_file(programs: Programs, tmp_path: Path) -> None:
    """A preload library that is not an ELF file is refused."""
    text = tmp_path / "lib.so"
    text.write_text("not a library\n")
    refused(programs, tmp_path, ["--preload", str(text)], expect="not an ELF file")


def test_preload_is_a_program_not_a_library(programs: Programs, tmp_path: Path) -> None:
    """A program given as the preload library is refused: not a shared library."""
    refused(programs, tmp_path, ["--preload", programs.rprobe], expect="not a shared library")


def test_preload_32bit_only(programs: Programs, tmp_path: Path) -> None:
    """A 32-bit-only preload library is refused: no 64-bit program could load it."""
    if "librobustmark32" not in programs:
        pytest.skip("gcc -m32 unavailable")
    refused(programs, tmp_path, ["--preload", programs.librobustmark32], expect="32-bit")


def test_bad_env_option(programs: Programs, tmp_path: Path) -> None:
    """--env without NAME=VALUE is refused."""
    refused(
        programs,
        tmp_path,
        ["--preload", programs.librobustmark, "--env", "NOVALUE"],
        expect="not NAME=VALUE",
    )


def test_unknown_option(programs: Programs, tmp_path: Path) -> None:
    """An unknown option is refused, naming it."""
    refused(
        programs,
        tmp_path,
        ["--preload", programs.librobustmark, "--frobnicate"],
        expect="--frobnicate",
    )


def test_bad_log_level_option(programs: Programs, tmp_path: Path) -> None:
    """An unknown --log-level is refused, naming it."""
    refused(
        programs,
        tmp_path,
        ["--preload", programs.librobustmark, "--log-level", "loud"],
        expect="loud",
    )


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_unusable_log_file(programs: Programs, tmp_path: Path, where: str) -> None:
    """A --log-file that cannot be written is refused, naming it."""
    path = tmp_path / "no" / "x.log" if where == "missing directory" else tmp_path
    refused(
        programs,
        tmp_path,
        ["--preload", programs.librobustmark, "--log-file", str(path)],
        expect=str(path),
    )


def test_nothing_started_even_with_a_valid_command(programs: Programs, tmp_path: Path) -> None:
    """The refusal comes before any fork: not even vgpu-launch's own child exists."""
    path = write_config(tmp_path, "bogus = 1\n")
    marker = tmp_path / "ran"
    run = launch.run(["--config", path, "--", "sh", "-c", f"touch {marker}"])
    assert run.returncode == 2
    assert not marker.exists()
    assert not run.events  # not even the start event


def test_valid_configuration_still_runs(programs: Programs, tmp_path: Path) -> None:
    """The checks above do not refuse a good file (a control for the refusals)."""
    path = write_config(tmp_path, f'preload = ["{programs.librobustmark}"]\nlog_level = "info"\n')
    marker = tmp_path / "ran"
    run = launch.run(["--config", path, "--", programs.rprobe, "--touch", str(marker)])
    assert run.returncode == 0, run.describe()
    assert marker.exists()
    assert "marker=1" in run.stdout
