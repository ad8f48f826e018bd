"""Command-line splitting and the argparse surface, checked against the option schema."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from vgpu_launch.config import Config
from vgpu_launch.options import (
    OPTIONS,
    SETTINGS,
    Kind,
    Option,
    build_parser,
    parse_launcher,
    split_command,
    subcommand_parser,
)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def test_command_after_double_dash() -> None:
    """Everything after -- is CMD, even what looks like an option."""
    assert split_command(["--preload", "/a.so", "--", "ollama", "serve", "--x"]) == (
        ["--preload", "/a.so"],
        ["ollama", "serve", "--x"],
    )


def test_command_without_double_dash_starts_at_first_operand() -> None:
    """Without --, CMD starts at the first word that is neither an option nor its value."""
    assert split_command(["--strict", "--env", "A=1", "ollama", "-v"]) == (
        ["--strict", "--env", "A=1"],
        ["ollama", "-v"],
    )


def test_a_command_named_like_an_option_value() -> None:
    """An option's value is never taken for CMD."""
    assert split_command(["--log-level", "debug", "--", "--weird"]) == (
        ["--log-level", "debug"],
        ["--weird"],
    )


@pytest.mark.parametrize("action", _options(build_parser()), ids=lambda a: a.option_strings[-1])
def test_every_option_takes_a_value_or_is_a_flag(action: argparse.Action) -> None:
    """Each option of the parser takes exactly one value or none, and split_command agrees:
    the word after a value-taking option is its value, the word after a flag is CMD."""
    assert action.nargs in (None, 0), (action.option_strings, action.nargs)
    for flag in action.option_strings:
        if action.nargs == 0:
            assert split_command([flag, "cmd", "arg"]) == ([flag], ["cmd", "arg"])
        else:
            assert split_command([flag, "value", "cmd"]) == ([flag, "value"], ["cmd"])
            assert split_command([f"{flag}=value", "cmd"]) == ([f"{flag}=value"], ["cmd"])


def test_the_parser_is_the_schema() -> None:
    """The launcher's parser has exactly the schema's options, each spelled from its name, and
    --help; nothing is added or lost on the way."""
    flags = {s for a in _options(build_parser()) for s in a.option_strings}
    assert flags == {f for o in OPTIONS for f in o.flags} | {"-h", "--help"}
    for opt in OPTIONS:
        prefix = "--no-" if opt.negative else "--"  # an on-by-default flag turns it off
        assert opt.flag == prefix + opt.name.replace("_", "-")
        assert opt.env == "VGPU_LAUNCH_" + opt.name.upper()


def test_every_setting_is_a_config_field() -> None:
    """Each setting of the schema is a field of Config, and Config has no other settings."""
    fields = {f.name for f in dataclasses.fields(Config)} - {"config_file", "sources"}
    assert fields == set(SETTINGS)


@pytest.mark.parametrize("opt", list(SETTINGS.values()), ids=lambda o: o.name)
def test_every_setting_reaches_the_configuration(opt: Option) -> None:
    """Given on the command line, each setting arrives in config.load's values."""
    value = {
        Kind.PATHS: ["/x.so"],
        Kind.GLOBS: ["/usr/bin/ollama runner*"],
        Kind.ASSIGNMENTS: ["NAME=v"],
        Kind.CHOICE: [opt.choices[0]] if opt.choices else [],
        Kind.PATH: ["/x.log"],
        Kind.BOOL: [],
    }[opt.kind]
    values, config_path = parse_launcher([opt.flag, *value])
    assert config_path is None
    want = {
        Kind.PATHS: ["/x.so"],
        Kind.GLOBS: ["/usr/bin/ollama runner*"],
        Kind.ASSIGNMENTS: {"NAME": "v"},
        Kind.BOOL: not opt.negative,  # --no-NAME turns an on-by-default setting off
    }.get(opt.kind, value[0] if value else None)
    assert values == {opt.name: want}


@pytest.mark.parametrize("name", ["doctor", "status"])
def test_subcommand_errors_name_the_subcommand(name: str) -> None:
    """A bad subcommand option is one line naming the subcommand and its --help."""
    from vgpu_launch.errors import LaunchError

    with pytest.raises(LaunchError) as err:
        subcommand_parser(name).parse_args(["--frobnicate"])
    assert str(err.value).startswith(f"vgpu-launch {name}: unrecognized arguments: --frobnicate")
    assert f"(see vgpu-launch {name} --help)" in str(err.value)
    assert err.value.code == 2


def test_help_lists_every_setting_with_its_variable_and_file_key() -> None:
    """--help shows, for each setting, its option, environment variable and configuration
    file key on one line: what doctor's hint for a bad configuration points at."""
    text = build_parser().format_help()
    for opt in SETTINGS.values():
        key = f"[{opt.name}] " if opt.kind is Kind.ASSIGNMENTS else f"{opt.name} = "
        lines = [ln for ln in text.splitlines() if ln.split()[:2] == [opt.flag, opt.env]]
        assert len(lines) == 1 and key in lines[0], (opt.name, text)
