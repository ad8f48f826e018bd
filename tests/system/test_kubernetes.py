"""The Kubernetes example (packaging/kubernetes/), checked without a cluster.

- Every manifest validates against the Kubernetes API schema (kubernetes-validate from PyPI,
  bundled schemas, strict: unknown fields are errors), for the oldest and newest versions named.
- The ConfigMap's vgpu-launch.conf is a configuration vgpu-launch accepts.
- The Deployment's command, run by sh with HAMi's variables set, hands each of them to
  vgpu-launch as --env, and leaves out what HAMi did not set.
- Mounted the way the manifest mounts it (subPath: the file alone), the configuration passes
  vgpu-launch's ownership check; a ConfigMap volume's own directory, which kubelet makes 0777,
  would not.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import REPO, launch
from support.build import Programs

from vgpu_launch import config

MANIFESTS = sorted((REPO / "packaging" / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes release still maintained when this was written, and the newest known.
VERSIONS = ["1.31.0", "latest"]

try:
    import kubernetes_validate
    import yaml
except ImportError as exc:  # scripts/setup.sh installs it into .venv
    pytest.fail(
        f"{exc.name} is missing: pip install kubernetes-validate (scripts/setup.sh does)",
        pytrace=False,
    )


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def find(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in documents() if d["kind"] == kind]
    return doc


def test_there_are_manifests() -> None:
    """packaging/kubernetes holds the example ConfigMap and Deployment."""
    assert MANIFESTS
    kinds = sorted(d["kind"] for _, d in documents())
    assert kinds == ["ConfigMap", "Deployment"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,doc", documents(), ids=[n for n, _ in documents()])
def test_manifest_validates_against_the_schema(
    name: str, doc: dict[str, Any], version: str
) -> None:
    """Each resource is valid for the Kubernetes API (strict: no unknown fields)."""
    target = kubernetes_validate.latest_version() if version == "latest" else version
    kubernetes_validate.validate(doc, target, strict=True)


def test_configmap_holds_a_configuration_vgpu_launch_accepts(pub: Path) -> None:
    """vgpu-launch.conf from the ConfigMap parses and names HAMi's library."""
    text = find("ConfigMap")["data"]["vgpu-launch.conf"]
    path = pub / "vgpu-launch.conf"
    path.write_text(text)
    path.chmod(0o644)
    values = config.read_file(str(path))
    assert values["preload"] == ["/usr/local/vgpu/libvgpu.so"]


def _container() -> dict[str, Any]:
    (container,) = find("Deployment")["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _run_command(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The Deployment's command with a stand-in vgpu-launch that prints its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "vgpu-launch"
    fake.write_text('#!/bin/sh\nfor a; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    proc = subprocess.run(
        _container()["command"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": f"{bindir}:/usr/bin:/bin", **env},
    )
    return proc.stdout.splitlines()


def test_command_passes_hamis_variables_on(tmp_path: Path) -> None:
    """HAMi's per-pod variables reach vgpu-launch as --env, unset ones are left out."""
    args = _run_command(
        tmp_path,
        {
            "CUDA_DEVICE_MEMORY_LIMIT_0": "8000m",
            "CUDA_DEVICE_SM_LIMIT": "50",
            "CUDA_DEVICE_MEMORY_SHARED_CACHE": "/usr/local/vgpu/x.cache",
        },
    )
    assert args == [
        "--env",
        "CUDA_DEVICE_MEMORY_LIMIT_0=8000m",
        "--env",
        "CUDA_DEVICE_SM_LIMIT=50",
        "--env",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE=/usr/local/vgpu/x.cache",
        "--",
        "/usr/bin/ollama",
        "serve",
    ]


def test_command_without_hami_variables(tmp_path: Path) -> None:
    """Without HAMi's variables the command runs the server with no --env at all."""
    assert _run_command(tmp_path, {}) == ["--", "/usr/bin/ollama", "serve"]


def test_security_context_drops_everything() -> None:
    """The example runs with no capability and the runtime's default seccomp profile."""
    ctx = _container()["securityContext"]
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert "add" not in ctx["capabilities"]


def _configmap_volume(root: Path, text: str) -> Path:
    """The layout kubelet gives a ConfigMap volume: a 0777 directory, a timestamped 0755
    directory with the files, a ..data link to it and one link per key."""
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    stamp = root / "..2026_01_01_00_00_00.000000000"
    stamp.mkdir(mode=0o755)
    (stamp / "vgpu-launch.conf").write_text(text)
    (stamp / "vgpu-launch.conf").chmod(0o644)
    (root / "..data").symlink_to(stamp.name)
    (root / "vgpu-launch.conf").symlink_to("..data/vgpu-launch.conf")
    return root


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a mount namespace)")
def test_configuration_mounted_as_the_manifest_does(programs: Programs, pub: Path) -> None:
    """subPath-mounted into the image's /etc/vgpu-launch it passes; the volume's dir would not."""
    text = f'preload = ["{programs.librobustmark}"]\n'
    volume = _configmap_volume(pub / "volume", text)
    run = launch.run(
        ["--config", str(volume / "vgpu-launch.conf"), "--", programs.rprobe], log_format=None
    )
    assert run.returncode == 2 and f"directory {volume} (mode 0777" in run.stderr, run.describe()

    etc = pub / "etc-vgpu-launch"  # the image's directory, with the package's file in it
    etc.mkdir(mode=0o755)
    (etc / "vgpu-launch.conf").write_text("# packaged\n")
    script = (
        f'mount --bind {volume / "vgpu-launch.conf"} {etc / "vgpu-launch.conf"} && exec "$0" "$@"'
    )
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            *launch.launcher_argv(
                ["--config", str(etc / "vgpu-launch.conf"), "--", programs.rprobe]
            ),
        ],
        capture_output=True,
        text=True,
        env=launch.clean_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "marker=1" in proc.stdout, proc.stderr[-3000:]
