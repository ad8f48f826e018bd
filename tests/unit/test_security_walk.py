"""The path walk behind the refusal of files others could change (vgpu_launch/security.py), on
trees made here: "..", relative and looping symbolic links, a file replaced after it was
opened, the override. The refusals end to end are tests/robustness/test_security.py's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vgpu_launch import security
from vgpu_launch.errors import ConfigError

# pub (../conftest.py) is root's: the walk trusts root alone here.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (root-owned directories)")


def test_walk_follows_dotdot_and_relative_links(pub: Path) -> None:
    """The walk follows '..' and relative links, and finds a writable directory on the way."""
    (pub / "a" / "b").mkdir(parents=True)
    target = pub / "a" / "f"
    target.write_text("x")
    (pub / "a" / "b" / "up").symlink_to("../f")
    assert security.find_problem(str(pub / "a" / "b" / ".." / "b" / "up"), {0}) is None
    (pub / "a").chmod(0o777)
    found = security.find_problem(str(pub / "a" / "b" / "up"), {0})
    assert found is not None and found.path == str(pub / "a")


def test_walk_symlink_loop_raises(pub: Path) -> None:
    """A symbolic link loop ends the walk with an error, not a hang."""
    (pub / "x").symlink_to("y")
    (pub / "y").symlink_to("x")
    with pytest.raises(OSError):
        security.find_problem(str(pub / "x"), {0})


def test_check_open_notices_a_replaced_file(pub: Path) -> None:
    """A file replaced between its check and its opening is refused."""
    a = pub / "a.conf"
    a.write_text("x")
    b = pub / "b.conf"
    b.write_text("y")
    with open(b, "rb") as f, pytest.raises(ConfigError, match="replaced"):
        security.check_open(str(a), f.fileno(), "configuration file")


def test_allow_insecure_accepts_what_is_refused_without_it(pub: Path) -> None:
    """With allow_insecure a world-writable file passes the check that refuses it without."""
    f = pub / "f"
    f.write_text("x")
    f.chmod(0o666)
    with pytest.raises(ConfigError, match="mode 0666"):
        security.check(str(f), "preload library")
    security.check(str(f), "preload library", allow_insecure=True)
