"""What ships, checked as it is used: the .deb in a booted Debian 12 (tests marked ``systemd``),
its build and man page, podman containers, and the Kubernetes example (offline, no cluster).

Fixtures, on top of ../conftest.py:

``bookworm_root``  (session)
    The cached clean Debian 12 root (harness.ensure_root(): debootstrap once per machine,
    about a minute and 300 MB, in /var/cache/vgpu-launch-tests or $VGPU_LAUNCH_TEST_CACHE).
``deb_package``  (session)
    The .deb that packaging/build-deb.sh builds from this checkout.
``boot_system``  (session; a factory)
    ``with boot_system() as system:`` a fresh system booted on a throwaway overlay of that root.

A test marked ``systemd`` is skipped where such a system cannot be had (not root, a tool
missing, no overlayfs or cgroup v2); with VGPU_TEST_REQUIRE_SYSTEM=1 (CI) it fails
instead, so the system tests cannot silently stop running.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

REPO = Path(__file__).resolve().parents[2]


def _require_system() -> None:
    why = harness.missing_requirements()
    if why:
        message = "a booted systemd is not available here: " + ", ".join(why)
        if os.environ.get("VGPU_TEST_REQUIRE_SYSTEM") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _system_requirements(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("systemd") is not None:
        _require_system()


@pytest.fixture(scope="session")
def bookworm_root() -> Path:
    _require_system()
    return harness.ensure_root(log=lambda msg: print(f"[system tests] {msg}", flush=True))


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [t for t in ("dpkg-buildpackage", "dh", "pybuild") if shutil.which(t) is None]
    if missing:
        message = (
            "cannot build the .deb here, missing: "
            + ", ".join(missing)
            + " (apt-get install dpkg-dev debhelper dh-python pybuild-plugin-pyproject)"
        )
        if os.environ.get("VGPU_TEST_REQUIRE_SYSTEM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    t0 = time.monotonic()
    deb = harness.build_deb(tmp_path_factory.mktemp("deb"), REPO)
    print(f"[system tests] built {deb.name} in {time.monotonic() - t0:.0f} s", flush=True)
    return deb


@pytest.fixture(scope="session")
def boot_system(bookworm_root: Path) -> Callable[..., harness.BootedSystem]:
    def boot(**kw: object) -> harness.BootedSystem:
        return harness.BootedSystem(bookworm_root, **kw)  # type: ignore[arg-type]

    return boot
