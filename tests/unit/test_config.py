"""Configuration sources and their precedence: command line, environment, file."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgpu_launch.config import load
from vgpu_launch.errors import ConfigError

FILE = """
preload = ["/file/a.so"]
strict = true
log_level = "warning"
[env]
LIMIT = "8g"
OTHER = "x"
"""


@pytest.fixture
def conf(tmp_path: Path) -> str:
    p = tmp_path / "vgpu-launch.conf"
    p.write_text(FILE)
    return str(p)


def test_file_alone(conf: str) -> None:
    """A configuration file alone gives its settings, each with its source."""
    cfg = load({}, {}, config_path=conf)
    assert cfg.preload == ["/file/a.so"] and cfg.strict and cfg.env == {"LIMIT": "8g", "OTHER": "x"}
    assert cfg.sources["preload"] == f"file {conf}"


def test_environment_over_file_and_command_line_over_both(conf: str) -> None:
    """The environment wins over the file, the command line over both."""
    environ = {
        "VGPU_LAUNCH_PRELOAD": "/env/a.so:/env/b.so /env/c.so",
        "VGPU_LAUNCH_ENV": "LIMIT=4g",
        "VGPU_LAUNCH_STRICT": "0",
    }
    cfg = load({}, environ, config_path=conf)
    assert cfg.preload == ["/env/a.so", "/env/b.so", "/env/c.so"]
    assert cfg.env == {"LIMIT": "4g", "OTHER": "x"} and not cfg.strict
    assert cfg.sources["preload"] == "VGPU_LAUNCH_PRELOAD"
    cfg = load({"preload": ["/cli.so"], "env": {"LIMIT": "2g"}}, environ, config_path=conf)
    assert cfg.preload == ["/cli.so"] and cfg.env["LIMIT"] == "2g"
    assert cfg.sources["preload"] == "command line"


def test_strict_with_exclude_is_refused(conf: str) -> None:
    """Strict mode with exclude is refused, saying they cannot be combined."""
    with pytest.raises(ConfigError, match=r"strict mode .* cannot be combined with exclude"):
        load({"exclude": ["nvidia-smi"]}, {}, config_path=conf)


def test_config_path_from_environment(conf: str) -> None:
    """VGPU_LAUNCH_CONFIG names the configuration file."""
    assert load({}, {"VGPU_LAUNCH_CONFIG": conf}).preload == ["/file/a.so"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('preloads = ["/a.so"]', "unknown key 'preloads'"),
        ("strict = 3", "strict must be true or false"),
        ('log_format = "xml"', "log_format must be one of json, console"),
        ('preload = [""]', "empty path"),
        ('preload = ["/a b.so"]', "separators"),
        ("[env]\nLD_PRELOAD = '/x.so'", "set LD_PRELOAD with preload"),
        ("preload = [", "configuration file"),
    ],
)
def test_bad_file_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    """Each kind of bad file gives one line naming the problem."""
    p = tmp_path / "bad.conf"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load({}, {}, config_path=str(p))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"VGPU_LAUNCH_STRICT": "maybe"}, "VGPU_LAUNCH_STRICT"),
        ({"VGPU_LAUNCH_ENV": "NOEQUALS"}, "NAME=VALUE"),
        ({"VGPU_LAUNCH_PRELOD": "/a.so"}, "unknown environment variable VGPU_LAUNCH_PRELOD"),
        ({"VGPU_LAUNCH_LOG_LEVEL": "loud"}, "log_level must be one of"),
    ],
)
def test_bad_environment(environ: dict[str, str], message: str) -> None:
    """Each kind of bad variable gives an error naming it."""
    with pytest.raises(ConfigError) as err:
        load({}, environ)
    assert message in str(err.value)


def test_missing_file_named_explicitly_is_an_error(tmp_path: Path) -> None:
    """A configuration file named but missing is an error."""
    with pytest.raises(ConfigError, match="not found"):
        load({}, {}, config_path=str(tmp_path / "nope.conf"))
