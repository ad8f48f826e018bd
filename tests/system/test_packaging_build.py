"""The packages build from this checkout: the .deb is lintian-clean (each remaining tag
overridden with its reason), the RPM spec builds with rpmbuild and ships the same files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC_DIR = "/usr/share/doc/vgpu-launch/"


def shipped_docs() -> list[str]:
    """README.md and every file of docs/, as the packages lay them out under DOC_DIR."""
    return [
        "README.md",
        *sorted(f"docs/{p.name}" for p in (REPO / "docs").iterdir() if p.is_file()),
    ]


def link_targets(doc: str) -> list[str]:
    """Where the relative links of the shipped document ``doc`` lead, once installed."""
    text = (REPO / doc).read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    return [
        os.path.normpath(os.path.join(os.path.dirname(DOC_DIR + doc), link))
        for link in links
        if "://" not in link and not link.startswith("mailto:")
    ]


def check_docs_shipped(paths: set[str]) -> None:
    """Every doc is installed as it is named in the source tree, and every relative link of
    the README and the docs leads to an installed file."""
    missing = [DOC_DIR + d for d in shipped_docs() if DOC_DIR + d not in paths]
    assert not missing, f"not installed: {missing}"
    broken = [(d, t) for d in shipped_docs() for t in link_targets(d) if t not in paths]
    assert not broken, f"links to files that are not installed: {broken}"


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        message = f"{tool} not installed"
        if os.environ.get("VGPU_TEST_REQUIRE_SYSTEM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def test_deb_is_lintian_clean(deb_package: Path) -> None:
    """lintian, pedantic and experimental tags included, finds nothing in the .deb."""
    need("lintian")
    changes = sorted(deb_package.parent.glob("vgpu-launch_*.changes"))
    assert changes
    proc = subprocess.run(
        [
            "lintian",
            "--pedantic",
            "--display-info",
            "--display-experimental",
            "--fail-on",
            "error,warning,info,pedantic,experimental",
            "--suppress-tags",
            # masked, informational only: pybuild's dist-info metadata
            "package-contains-documentation-outside-usr-share-doc",
            str(changes[0]),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    tags = [line for line in proc.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:")]
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr


def test_deb_contents(deb_package: Path) -> None:
    """The .deb holds the program, its page, its units and its configuration."""
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb_package)], capture_output=True, text=True, check=True
    ).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in (
        "/usr/bin/vgpu-launch",
        "/usr/lib/python3/dist-packages/vgpu_launch/cli.py",
        "/usr/share/man/man1/vgpu-launch.1.gz",
        "/etc/vgpu-launch/vgpu-launch.conf",
        "/lib/systemd/system/vgpu-launch@.service",
        "/usr/share/vgpu-launch/systemd/ollama.service.d/vgpu-launch.conf",
        "/usr/share/doc/vgpu-launch/examples/vgpu-launch.env",
    ):
        assert path in paths, path
    check_docs_shipped(paths)
    # nothing active in systemd's search path apart from the template
    assert not [
        p for p in paths if ".service.d/" in p and p.startswith(("/lib/systemd", "/etc/systemd"))
    ]


def test_rpm_builds(tmp_path: Path) -> None:
    """The RPM builds and ships the same files, config and dependencies."""
    need("rpmbuild")
    proc = subprocess.run(
        [str(REPO / "packaging" / "build-rpm.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    rpms = sorted(tmp_path.glob("vgpu-launch-*.noarch.rpm"))
    assert len(rpms) == 1 and sorted(tmp_path.glob("vgpu-launch-*.src.rpm"))
    files = subprocess.run(
        ["rpm", "-qlp", str(rpms[0])], capture_output=True, text=True, check=True
    ).stdout.split()
    for path in (
        "/usr/bin/vgpu-launch",
        "/etc/vgpu-launch/vgpu-launch.conf",
        "/usr/lib/systemd/system/vgpu-launch@.service",
        "/usr/share/vgpu-launch/systemd/ollama.service.d/vgpu-launch.conf",
    ):
        assert path in files, path
    assert any(p.endswith("/vgpu_launch/cli.py") for p in files)
    assert any(p.startswith("/usr/share/man/man1/vgpu-launch.1") for p in files)
    check_docs_shipped(set(files))
    config = subprocess.run(
        ["rpm", "-qcp", str(rpms[0])], capture_output=True, text=True, check=True
    ).stdout.split()
    assert config == ["/etc/vgpu-launch/vgpu-launch.conf"]
    requires = subprocess.run(
        ["rpm", "-qRp", str(rpms[0])], capture_output=True, text=True, check=True
    ).stdout
    for dep in ("python3-ptrace", "python3-prctl", "python3-structlog"):
        assert dep in requires, requires
