"""The README's promises that the code can break: its first two commands, and what its Testing
paragraph says the tests install and where they cache."""

from __future__ import annotations

import os
import re

from support import REPO

README = (REPO / "README.md").read_text()


def the_testing_section() -> str:
    return README.split("\n## Testing\n", 1)[1].split("\n## ", 1)[0]


def test_the_first_two_commands_are_the_demo_and_the_tests() -> None:
    """The README opens with the two commands a newcomer runs, and both exist."""
    block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    assert commands == ["./examples/ollama-like/demo.sh", "./scripts/test.sh"]
    for command in commands:
        assert os.access(REPO / command, os.X_OK), command


def test_testing_paragraph_matches_setup_and_caches() -> None:
    """The number of Debian packages, the virtual environments and the cache directories the
    Testing paragraph names are those of scripts/setup.sh and the test harness."""
    text = " ".join(the_testing_section().split())
    setup = (REPO / "scripts" / "setup.sh").read_text()
    packages = re.search(r'^packages="([^"]*)"', setup, re.M | re.S)
    assert packages
    said = re.search(r"\(about (\d+) names:", text)
    assert said, text
    assert abs(int(said[1]) - len(packages[1].split())) <= 5, (said[1], packages[1].split())
    for venv in (".venv", ".venv-pypi"):
        assert f"{venv}/bin/python" in setup and f"`{venv}`" in text
    harness = (REPO / "tests" / "system" / "harness.py").read_text()
    cache = re.search(r'"VGPU_LAUNCH_TEST_CACHE", "([^"]+)"', harness)
    assert cache and f"`{cache[1]}/`" in text
    assert "rm -rf .venv .venv-pypi .cache " + cache[1] in text
    podman = (REPO / "tests" / "system" / "test_podman.py").read_text()
    user = re.search(r'^USER = "([^"]+)"', podman, re.M)
    assert user and f"userdel -r {user[1]}" in text and f"/var/lib/{user[1]}" in text
