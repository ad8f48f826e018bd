"""vgpu-launch(1) cannot drift from the program: every option of the parser, every setting's
environment variable and configuration key is in the page, and the page renders cleanly."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_manpage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vgpu_launch_manpage",
                                                  REPO / "packaging" / "manpage.py")
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
    used = {o.env for o in options.OPTIONS if o.kind is not options.Kind.VERSION}
    assert "VGPU_LAUNCH_CONFIG" in used
    for source in (REPO / "vgpu_launch").rglob("*.py"):
        used |= set(re.findall(r"\bVGPU_LAUNCH_[A-Z][A-Z_]*[A-Z]\b", source.read_text()))
    hidden = set(manpage.UNDOCUMENTED_VARS) | {"VGPU_LAUNCH_PYTHON"}
    missing = sorted(v for v in used - hidden if v not in text)
    assert not missing, f"variables missing from vgpu-launch(1): {missing}"


def test_shipped_config_names_every_key() -> None:
    """/etc/vgpu-launch/vgpu-launch.conf shows every key, commented out, as valid TOML."""
    import tomllib

    conf = (REPO / "packaging" / "config" / "vgpu-launch.conf").read_text()
    live = [line for line in conf.splitlines() if line.strip() and not line.startswith("#")]
    assert live == [], "the shipped configuration must set nothing"
    settings = "".join(line[1:] + "\n" for line in conf.splitlines()
                       if line.startswith("#") and not line.startswith("# ") and line != "#")
    parsed = tomllib.loads(settings)
    assert set(parsed) == set(manpage.config_keys())


def test_page_renders_without_warnings(page: str, tmp_path: Path) -> None:
    """groff renders the page without a warning."""
    if shutil.which("groff") is None:
        pytest.skip("groff not installed")
    src = tmp_path / "vgpu-launch.1"
    src.write_text(page)
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_generator_writes_the_file(tmp_path: Path) -> None:
    """packaging/manpage.py writes the page, dated as asked."""
    out = tmp_path / "vgpu-launch.1"
    subprocess.run([sys.executable, str(REPO / "packaging" / "manpage.py"), "--output", str(out),
                    "--date", "2000-01-01"], cwd=REPO, check=True,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    text = out.read_text()
    assert text.startswith('.TH VGPU\\-LAUNCH 1 "2000-01-01"')
