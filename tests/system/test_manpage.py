"""vgpu-launch(1) cannot drift from the program: every option of the parser, every setting's
environment variable and configuration key is in the page, and the page renders cleanly."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_manpage() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "vgpu_launch_manpage", REPO / "packaging" / "manpage.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


manpage = load_manpage()


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    sys.path.insert(0, str(REPO))
    from vgpu_launch.options import build_parser

    return build_parser()


@pytest.fixture(scope="module")
def page(parser: argparse.ArgumentParser) -> str:
    return manpage.render(parser, version="0.0.0", date="2000-01-01")


def plain(roff: str) -> str:
    """The page's text with roff escapes for dashes and fonts undone (enough to search)."""
    text = roff.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")
    return re.sub(r"\\f[BIRP]", "", text)


def all_options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def test_every_option_is_in_the_page(parser: argparse.ArgumentParser, page: str) -> None:
    """Every option of the parser is named in vgpu-launch(1)."""
    text = plain(page)
    options = all_options(parser)
    assert "--preload" in options  # the parser is the real one
    missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    assert not missing, f"options missing from vgpu-launch(1): {missing}"


def test_every_option_has_its_own_entry(parser: argparse.ArgumentParser, page: str) -> None:
    """Each option heads a .TP entry of OPTIONS, not just a mention in prose."""
    section = page.split(".SH OPTIONS", 1)[1].split("\n.SH ", 1)[0]
    heads = set()
    for entry in section.split(".TP\n")[1:]:
        head = plain(entry.split("\n", 1)[0])
        heads |= {item.split()[0] for item in head.split(", ") if item.split()}
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            for option in action.option_strings:
                assert option in heads, (option, sorted(heads))


def test_choices_and_metavars_are_shown(parser: argparse.ArgumentParser, page: str) -> None:
    """Each option's choices and value name appear as the parser has them."""
    text = plain(page)
    for action in parser._actions:
        if action.choices and action.option_strings:
            assert "|".join(map(str, action.choices)) in text, action.option_strings
        if isinstance(action.metavar, str) and action.option_strings:
            assert f"{action.option_strings[-1]} {action.metavar}" in text


def test_subcommands_are_in_the_page(page: str) -> None:
    """doctor and status, and every option of theirs, are in the page."""
    text = plain(page)
    for name in ("doctor", "status"):
        assert f"vgpu-launch {name}" in text
    # and, where the program builds their parsers, every option of theirs
    for name, sub in manpage.command_parsers().items():
        missing = [o for o in all_options(sub) if o not in text]
        assert not missing, f"options of vgpu-launch {name} missing: {missing}"


def test_every_setting_is_documented(page: str) -> None:
    """Each configuration key and its environment variable (vgpu_launch.options.SETTINGS), the
    variable of every other option (VGPU_LAUNCH_CONFIG), and every VGPU_LAUNCH_* variable the
    source names, except test hooks and internal ones."""
    from vgpu_launch import options

    text = plain(page)
    keys = manpage.config_keys()
    assert "preload" in keys
    for key, env in keys.items():
        assert env in text, env
        label = f"[{key}]" if key in manpage.TABLE_KEYS else key
        assert re.search(rf"^{re.escape(label)}$", text, re.M), f"config key {key}"
    # --version and -v have no variable: they are not settings
    used = {
        o.env for o in options.OPTIONS if o.kind not in (options.Kind.VERSION, options.Kind.VERBOSE)
    }
    assert "VGPU_LAUNCH_CONFIG" in used
    for source in (REPO / "vgpu_launch").rglob("*.py"):
        used |= set(re.findall(r"\bVGPU_LAUNCH_[A-Z][A-Z_]*[A-Z]\b", source.read_text()))
    hidden = set(manpage.UNDOCUMENTED_VARS)
    missing = sorted(v for v in used - hidden if v not in text)
    assert not missing, f"variables missing from vgpu-launch(1): {missing}"


def test_shipped_config_names_every_key() -> None:
    """/etc/vgpu-launch/vgpu-launch.conf shows every key, commented out, as valid TOML."""
    import tomllib

    conf = (REPO / "packaging" / "config" / "vgpu-launch.conf").read_text()
    live = [line for line in conf.splitlines() if line.strip() and not line.startswith("#")]
    assert live == [], "the shipped configuration must set nothing"
    settings = "".join(
        line[1:] + "\n"
        for line in conf.splitlines()
        if line.startswith("#") and not line.startswith("# ") and line != "#"
    )
    parsed = tomllib.loads(settings)
    assert set(parsed) == set(manpage.config_keys())


def test_page_renders_without_warnings(page: str, tmp_path: Path) -> None:
    """groff renders the page without a warning."""
    if shutil.which("groff") is None:
        pytest.skip("groff not installed")
    src = tmp_path / "vgpu-launch.1"
    src.write_text(page)
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_generator_writes_the_file(tmp_path: Path) -> None:
    """packaging/manpage.py writes the page, dated as asked."""
    out = tmp_path / "vgpu-launch.1"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "packaging" / "manpage.py"),
            "--output",
            str(out),
            "--date",
            "2000-01-01",
        ],
        cwd=REPO,
        check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    text = out.read_text()
    assert text.startswith('.TH VGPU\\-LAUNCH 1 "2000-01-01"')


def section(page: str, name: str) -> str:
    """The roff source of section NAME of the page."""
    assert f"\n.SH {name}\n" in page, f"no {name} section"
    return page.split(f"\n.SH {name}\n", 1)[1].split("\n.SH ", 1)[0]


def tp_heads(roff: str) -> list[str]:
    """The plain text of the heads of the .TP entries in ``roff``."""
    return [plain(entry.split("\n", 1)[0]) for entry in roff.split(".TP\n")[1:]]


def test_description_says_each_thing_once(parser: argparse.ArgumentParser, page: str) -> None:
    """DESCRIPTION does not repeat itself: the summary of --help is not added to the page's own
    paragraphs, and no two paragraphs share more than a few words."""
    text = section(page, "DESCRIPTION")
    first = (parser.description or "").split(".")[0].strip()
    assert not first or first not in plain(text), first
    words = [
        {w.lower() for w in re.findall(r"[A-Za-z_]{5,}", plain(p))} for p in text.split("\n.PP\n")
    ]
    for i, a in enumerate(words):
        for j, b in enumerate(words[i + 1 :], i + 1):
            assert len(a & b) / len(a | b) < 0.15, (i, j, sorted(a & b))


def test_page_has_what_an_operator_needs(page: str) -> None:
    """`man vgpu-launch` is enough without the web: exit status, environment, files, the
    event schema, troubleshooting and pointers to the installed documentation."""
    heads = re.findall(r"^\.SH (.+)$", page, re.M)
    for name in (
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "ENVIRONMENT",
        "FILES",
        "EXIT STATUS",
        "LOG",
        "TROUBLESHOOTING",
        "EXAMPLES",
        "SEE ALSO",
    ):
        assert name in heads, name
    assert "/usr/share/doc/vgpu-launch/docs/troubleshooting.md" in plain(
        section(page, "FILES") + page
    )
    for path, _what in manpage.DOCS:
        assert (REPO / path).is_file(), path


def test_every_event_and_decision_is_in_the_log_section(page: str) -> None:
    """The events of docs/configuration.md's decision log table and every decision of the
    program head an entry of LOG."""
    from vgpu_launch.trace.policy import Decision

    heads = tp_heads(section(page, "LOG"))
    names = {n.strip() for h in heads for n in h.split(" (", 1)[0].split(",")}
    table = (REPO / "docs" / "configuration.md").read_text().split("## The decision log", 1)[1]
    documented = {
        n
        for cell in re.findall(r"^\| ((?:`[a-z-]+`(?:, )?)+) \|", table, re.M)
        for n in re.findall(r"`([a-z-]+)`", cell)
    }
    assert {"start", "exec", "end"} <= documented
    assert documented <= names, documented - names
    assert {d.value for d in Decision} <= names, {d.value for d in Decision} - names


def test_every_exit_status_of_the_program_is_listed(page: str) -> None:
    """EXIT STATUS lists every exit code vgpu-launch itself can end with."""
    from vgpu_launch import bootstrap, errors

    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    codes.add(bootstrap.EXIT_MISSING)
    listed = set(tp_heads(section(page, "EXIT STATUS")))
    assert {str(c) for c in codes} <= listed, listed


def test_jq_examples_survive_the_services_own_lines(page: str, tmp_path: Path) -> None:
    """Each jq command of the page, fed a journal holding the service's own non-JSON lines
    besides vgpu-launch's events, prints the events it selects."""
    if shutil.which("jq") is None:
        pytest.skip("jq not installed")
    journal = (
        "\n".join(
            [
                'time=2026-01-01T00:00:00 level=INFO source=server.go msg="starting"',
                json.dumps({"event": "start", "level": "info", "pid": 1}),
                "ggml_cuda_init: found 1 CUDA devices: {",
                json.dumps(
                    {
                        "event": "exec",
                        "level": "info",
                        "pid": 7,
                        "exe": "/usr/bin/ollama",
                        "decision": "injected",
                        "note": None,
                    }
                ),
                json.dumps({"event": "verify", "level": "warning", "pid": 7}),
                "}",
            ]
        )
        + "\n"
    )
    if shutil.which("groff") is None:
        pytest.skip("groff not installed")
    src = tmp_path / "vgpu-launch.1"
    src.write_text(page)
    text = subprocess.run(
        ["groff", "-man", "-Tascii", "-P-cbu", "-rLL=200n", str(src)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    log = text.split("\nLOG\n", 1)[1].split("\nTROUBLESHOOTING\n", 1)[0]
    # the commands as a reader copies them: continuation lines joined
    lines = re.sub(r"\\\n\s*", " ", log).splitlines()
    commands = [line.strip() for line in lines if line.strip().startswith("journalctl ")]
    assert len(commands) >= 2
    for command in commands:
        assert "jq" in command and "fromjson?" in command, command
        filt = command.split("| jq", 1)[1]
        proc = subprocess.run(
            f"jq {filt}", shell=True, input=journal, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0 and proc.stdout.strip(), (command, proc.stderr)
        assert all(json.loads(line)["pid"] == 7 for line in proc.stdout.splitlines()), command
