"""The Debian package on a clean Debian 12: install, what it puts where, the template unit,
remove and purge."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]


def upstream_version() -> str:
    text = (REPO / "vgpu_launch" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert m
    return m[1]


@pytest.fixture(scope="module")
def system(
    boot_system: Callable[..., harness.BootedSystem], deb_package: Path
) -> Iterator[harness.BootedSystem]:
    with boot_system() as system:
        t0 = time.monotonic()
        harness.install_deb(system, deb_package)
        print(f"apt-get install took {time.monotonic() - t0:.0f} s")
        yield system


def test_deb_metadata(deb_package: Path) -> None:
    """The .deb is architecture all and depends on Debian's Python libraries."""
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb_package)], capture_output=True, text=True, check=True
    ).stdout
    assert "Architecture: all" in fields
    depends = re.search(r"^Depends: (.*)$", fields, re.M)
    assert depends
    for dep in ("python3-ptrace", "python3-prctl", "python3-structlog"):
        assert dep in depends[1]


def test_installed_files(system: harness.BootedSystem) -> None:
    """Installed, the package has its files, conffile and pinned interpreter, no drop-in."""
    version = system.run("vgpu-launch", "--version").stdout.strip()
    # the installed copy, on Debian's python3
    assert version.startswith(
        f"vgpu-launch {upstream_version()} from "
        "/usr/lib/python3/dist-packages/vgpu_launch (Python 3."
    ), version
    assert " /usr/bin/python3;" in version, version
    assert system.run(
        "python3", "-c", "import vgpu_launch, sys; print(vgpu_launch.__file__)"
    ).stdout.startswith("/usr/lib/python3/dist-packages/vgpu_launch/")
    for path in (
        "/usr/share/man/man1/vgpu-launch.1.gz",
        "/etc/vgpu-launch/vgpu-launch.conf",
        "/lib/systemd/system/vgpu-launch@.service",
        "/usr/share/vgpu-launch/systemd/ollama.service.d/vgpu-launch.conf",
        "/usr/share/doc/vgpu-launch/examples/ollama.service.d/vgpu-launch.conf",
        "/usr/share/doc/vgpu-launch/examples/vgpu-launch.env",
        "/usr/share/doc/vgpu-launch/copyright",
    ):
        assert system.exists(path), path
    conffiles = system.run("cat", "/var/lib/dpkg/info/vgpu-launch.conffiles").stdout.split()
    assert "/etc/vgpu-launch/vgpu-launch.conf" in conffiles
    # shipped inactive: no drop-in in systemd's search path
    assert not system.exists("/etc/systemd/system/ollama.service.d")
    # /usr/bin/vgpu-launch runs Debian's python3 whatever PATH says
    script = system.run("cat", "/usr/bin/vgpu-launch").stdout
    assert "/usr/bin/python3" in script


def test_docs_are_installed(system: harness.BootedSystem) -> None:
    """dpkg -L lists README.md and every file of docs/ in the doc directory, where the
    README's links find them."""
    listed = set(system.run("dpkg", "-L", "vgpu-launch").stdout.split())
    docs = ["README.md", *(f"docs/{p.name}" for p in (REPO / "docs").iterdir() if p.is_file())]
    for doc in docs:
        assert f"/usr/share/doc/vgpu-launch/{doc}" in listed, doc
    readme = system.run("cat", "/usr/share/doc/vgpu-launch/README.md").stdout
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert system.exists(f"/usr/share/doc/vgpu-launch/{link}"), link


def test_installed_launcher_ignores_path_python3(system: harness.BootedSystem) -> None:
    """/usr/bin/vgpu-launch runs Debian's python3 even when PATH starts with one that lacks
    the libraries."""
    system.write("/tmp/foreign/python3", '#!/bin/sh\nexec /usr/bin/python3 -S "$@"\n', 0o755)
    proc = system.sh(
        "PATH=/tmp/foreign:$PATH vgpu-launch --preload "
        "\"$(readlink -f /lib/x86_64-linux-gnu/libc.so.6)\" -- /bin/sh -c 'exit 5'",
        check=False,
    )
    assert proc.returncode == 5, proc.stderr


def test_default_config_is_all_comments(system: harness.BootedSystem) -> None:
    """The shipped configuration is all comments, each one a valid key."""
    text = system.run("cat", "/etc/vgpu-launch/vgpu-launch.conf").stdout
    live = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert live == []
    # every commented key line, uncommented, is valid TOML of a known key
    script = (
        "import sys, tomllib\n"
        "lines = [l[1:] for l in open('/etc/vgpu-launch/vgpu-launch.conf') "
        "if l.startswith('#') and not l.startswith('# ') and l.strip() != '#']\n"
        "print(sorted(tomllib.loads(''.join(lines))))\n"
    )
    keys = system.run("python3", "-c", script).stdout
    for key in (
        "preload",
        "exclude",
        "strict",
        "no_follow",
        "log_format",
        "log_level",
        "log_file",
        "env",
        "force_env",
    ):
        assert f"'{key}'" in keys


def test_runs_a_command_with_the_preload(system: harness.BootedSystem) -> None:
    """The installed vgpu-launch puts the preload back and passes exit codes on."""
    # a library every program can preload: the C library itself
    libc = system.run(
        "python3",
        "-c",
        "import ctypes.util, os; print(os.path.realpath('/lib/x86_64-linux-gnu/libc.so.6'))",
    ).stdout.strip()
    proc = system.run(
        "vgpu-launch",
        "--log-format",
        "json",
        "--preload",
        libc,
        "--",
        "/bin/sh",
        "-c",
        'exec env -u LD_PRELOAD /bin/sh -c "echo \\$LD_PRELOAD"',
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == libc
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "exec" for e in events), proc.stderr
    # exit status of CMD comes back
    assert (
        system.run(
            "vgpu-launch", "--preload", libc, "--", "/bin/sh", "-c", "exit 7", check=False
        ).returncode
        == 7
    )
    assert (
        system.run("vgpu-launch", "--preload", libc, "--", "/nonexistent", check=False).returncode
        == 127
    )


TEMPLATE_ENV = """\
COMMAND=/bin/sleep 4242
VGPU_LAUNCH_PRELOAD={libc}
"""


def launcher_events(system: harness.BootedSystem, unit: str) -> list[dict[str, object]]:
    events = []
    for entry in system.journal("-u", unit):
        message = entry.get("MESSAGE")
        if isinstance(message, str) and message.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(message))
    return events


def test_template_unit_with_environment_file(system: harness.BootedSystem) -> None:
    """vgpu-launch@NAME.service runs the command of /etc/vgpu-launch/NAME.env."""
    libc = system.run("readlink", "-f", "/lib/x86_64-linux-gnu/libc.so.6").stdout.strip()
    example = system.run("cat", "/usr/share/doc/vgpu-launch/examples/vgpu-launch.env").stdout
    assert re.search(r"^COMMAND=", example, re.M)
    system.write("/etc/vgpu-launch/demo.env", TEMPLATE_ENV.format(libc=libc))
    system.systemctl("start", "vgpu-launch@demo.service")
    try:
        props = system.show("vgpu-launch@demo.service", "ActiveState", "KillMode", "MainPID")
        assert props["ActiveState"] == "active"
        assert props["KillMode"] == "mixed"
        harness.wait_for(
            "vgpu-launch's start event in the journal",
            lambda: any(
                e.get("event") == "start"
                for e in launcher_events(system, "vgpu-launch@demo.service")
            ),
            timeout=15,
            describe=lambda: system.journal_text("-u", "vgpu-launch@demo.service"),
        )
        assert any(p["argv"] == ["/bin/sleep", "4242"] for p in system.processes())
    finally:
        system.systemctl("stop", "vgpu-launch@demo.service")
    props = system.show("vgpu-launch@demo.service", "Result", "ActiveState")
    assert props == {"Result": "success", "ActiveState": "inactive"}


def test_remove_and_purge(system: harness.BootedSystem) -> None:
    """Remove keeps the configuration; purge removes it."""
    system.apt_get("remove", "vgpu-launch")
    assert not system.exists("/usr/bin/vgpu-launch")
    assert system.exists("/etc/vgpu-launch/vgpu-launch.conf")  # conffile kept until purge
    system.apt_get("purge", "vgpu-launch")
    assert not system.exists("/etc/vgpu-launch/vgpu-launch.conf")
