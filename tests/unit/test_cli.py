"""Command-line splitting and the argparse surface."""

from __future__ import annotations

from vgpu_launch.cli import build_parser, split_command


def test_command_after_double_dash() -> None:
    """Everything after -- is CMD, options included."""
    assert split_command(["--preload", "/a.so", "--", "ollama", "serve", "--x"]) == (
        ["--preload", "/a.so"],
        ["ollama", "serve", "--x"],
    )


def test_command_without_double_dash_starts_at_first_operand() -> None:
    """Without --, CMD starts at the first word that is not an option or its value."""
    assert split_command(["--strict", "--env", "A=1", "ollama", "-v"]) == (
        ["--strict", "--env", "A=1"],
        ["ollama", "-v"],
    )


def test_a_command_named_like_an_option_value() -> None:
    """After --, a word that looks like an option is CMD."""
    assert split_command(["--log-level", "debug", "--", "--weird"]) == (
        ["--log-level", "debug"],
        ["--weird"],
    )


def test_every_option_takes_a_value_or_is_a_flag() -> None:
    """The parser has every option of the launcher."""
    parser = build_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    assert {
        "--preload",
        "--env",
        "--force-env",
        "--exclude",
        "--log-format",
        "--log-level",
        "--log-file",
        "--no-follow",
        "--strict",
        "--config",
        "--version",
    } <= options
