"""vgpu-launch as the entrypoint of real containers: Debian's podman, rootful and rootless.

The image is made here, with no registry: the system tests' debootstrap root is imported as a
base image, packaging/container/Containerfile (the one docs/containers.md shows) installs the
.deb built from this checkout on it, and a second layer adds the ollama-like example
(examples/ollama-like) with its test shim as /usr/local/vgpu/libvgpu.so, where HAMi's device
plugin mounts its libvgpu.so. Every run has ``--network none`` and the runtime's default seccomp
profile and capability set unless a test says otherwise.

On these machines (Debian 12, podman 4.3) crun refuses the hybrid cgroup layout and podman's
default RLIMIT_NOFILE is above the machine's hard limit: every podman call uses runc, the
cgroupfs manager and explicit ulimits (see ../shared/design/containers.md). Rootful podman
keeps its images in a storage of its own under the test cache, so that the machine's own
podman images are not touched. Rootless runs use a system user (``vgpu-launch-test``) given a
subordinate uid/gid range, as an operator would set up one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "packaging" / "container" / "Containerfile"
STORE = harness.CACHE_DIR / "podman"
RUNROOT = Path("/run/vgpu-launch-tests/podman")
USER = "vgpu-launch-test"
SUBIDS = "300000:65536"
PREFIX = "localhost/vgpu-launch-test"
OLLAMA = "/usr/local/lib/ollama/ollama"
TOOLS = {"podman": "podman", "runc": "runc", "newuidmap": "uidmap", "slirp4netns": "slirp4netns"}
# The machine's limits (see the module docstring); nproc: runc sets it and must stay in bounds.
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
DEVICES = "3"  # what the runners must report: the shim's answer, from vgpu-launch's --env
CAP_SYS_PTRACE = 1 << 19


def _require_podman() -> None:
    missing = [
        f"{tool} (apt-get install {pkg})"
        for tool, pkg in TOOLS.items()
        if shutil.which(tool) is None
    ]
    if os.geteuid() != 0:
        missing.insert(0, "root")
    if missing:
        message = "podman tests need: " + ", ".join(missing)
        if os.environ.get("VGPU_TEST_REQUIRE_SYSTEM") == "1":
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Podman:
    """podman for one user: root (own storage under the test cache) or the rootless user."""

    user: str | None  # None: rootful

    @property
    def rootless(self) -> bool:
        return self.user is not None

    def argv(self, *args: str) -> list[str]:
        base = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
        if self.user is None:
            return [*base, "--root", str(STORE / "storage"), "--runroot", str(RUNROOT), *args]
        home = pwd.getpwnam(self.user).pw_dir
        return [
            "setpriv",
            f"--reuid={self.user}",
            f"--regid={self.user}",
            "--init-groups",
            "--",
            "env",
            "-i",
            f"HOME={home}",
            f"USER={self.user}",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            *base,
            "--root",
            f"{home}/storage",
            "--runroot",
            f"{home}/run",
            "--storage-driver",
            "overlay",
            *args,
        ]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            # not the checkout's directory: a rootless user may not enter it (a mktemp -d clone)
            cwd="/",
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)}: exit {proc.returncode}\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def run(
        self,
        *args: str,
        image: str,
        cmd: Sequence[str] = (),
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """``podman run --rm --network none`` with the machine's limits."""
        return self(
            "run",
            "--rm",
            "--network",
            "none",
            *LIMITS,
            *args,
            image,
            *cmd,
            check=False,
            timeout=timeout,
        )


@dataclass
class Images:
    podman: Podman
    app: str  # the ollama-like service under vgpu-launch
    archive: Path  # the same image as an OCI archive, for the rootless user


def _events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if isinstance(ev, dict) and "event" in ev:
                out.append(ev)
    return out


def _root_tag(root: Path) -> str:
    """A tag that changes whenever the cached root is rebuilt."""
    stamp = root / harness.STAMP
    digest = hashlib.sha256(f"{stamp.read_text()}{stamp.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="module")
def images(
    bookworm_root: Path,
    deb_package: Path,
    ollama_like: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Images]:
    """Rootful images: base (the debootstrap root), vgpu-launch (the documented Containerfile
    with this checkout's .deb), app (the ollama-like service on top)."""
    _require_podman()
    podman = Podman(None)
    base = f"{PREFIX}/bookworm:{_root_tag(bookworm_root)}"
    if podman("image", "exists", base, check=False).returncode != 0:
        with subprocess.Popen(
            ["tar", "-C", str(bookworm_root), "-c", "."], stdout=subprocess.PIPE
        ) as tar:
            imported = subprocess.run(
                podman.argv("import", "-", base),
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        assert imported.returncode == 0, imported.stderr
    ctx = tmp_path_factory.mktemp("podman-ctx")
    shutil.copy(deb_package, ctx)
    shutil.copy(CONTAINERFILE, ctx / "Containerfile")
    # RUN apt-get needs Debian's archive, as the other system tests do (--network host).
    podman(
        "build",
        "--network",
        "host",
        *LIMITS,
        "--build-arg",
        f"BASE={base}",
        "-t",
        f"{PREFIX}/vgpu-launch:test",
        str(ctx),
        timeout=600,
    )
    app_ctx = tmp_path_factory.mktemp("podman-app")
    for name in ("ollama", "libcuda.so.1", "libvgpu-test-shim.so"):
        shutil.copy(Path(ollama_like.dir) / name, app_ctx / name)
    (app_ctx / "Containerfile").write_text(
        f"FROM {PREFIX}/vgpu-launch:test\n"
        "COPY ollama libcuda.so.1 /usr/local/lib/ollama/\n"
        "COPY libvgpu-test-shim.so /usr/local/vgpu/libvgpu.so\n"
        f'CMD ["{OLLAMA}", "serve"]\n'
    )
    app = f"{PREFIX}/ollama-like:test"
    podman("build", "-t", app, str(app_ctx))
    podman("image", "prune", "-f", check=False)  # earlier runs' layers
    shared = Path(tempfile.mkdtemp(prefix="vgpu-launch-podman-"))
    shared.chmod(0o755)
    archive = shared / "app.tar"
    podman("save", "--format", "oci-archive", "-o", str(archive), app, timeout=300)
    archive.chmod(0o644)
    yield Images(podman, app, archive)
    shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(scope="module")
def rootless(images: Images) -> Podman:
    """The rootless user (made if missing, with a subordinate id range) with the app loaded."""
    if subprocess.run(["id", USER], capture_output=True, check=False).returncode != 0:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--create-home",
                "--home-dir",
                f"/var/lib/{USER}",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ],
            check=True,
        )
    for table in ("/etc/subuid", "/etc/subgid"):
        lines = Path(table).read_text().splitlines() if Path(table).exists() else []
        if not any(line.startswith(f"{USER}:") for line in lines):
            with open(table, "a") as f:
                f.write(f"{USER}:{SUBIDS}\n")
    podman = Podman(USER)
    podman("load", "-i", str(images.archive), timeout=300)
    podman("image", "prune", "-f", check=False)
    return podman


@pytest.fixture(params=["rootful", "rootless"])
def podman(request: pytest.FixtureRequest, images: Images) -> Podman:
    if request.param == "rootless":
        return request.getfixturevalue("rootless")  # type: ignore[no-any-return]
    return images.podman


def runner_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("runner pid=")]


def status_fields(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


# ---- the runtime's defaults -----------------------------------------------------------------


def test_defaults_inside_the_container(podman: Podman, images: Images) -> None:
    """The container has podman's default seccomp profile and no CAP_SYS_PTRACE."""
    proc = podman.run(
        "--entrypoint", "cat", image=images.app, cmd=["/proc/self/status", "/proc/self/uid_map"]
    )
    assert proc.returncode == 0, proc.stderr
    fields = status_fields(proc.stdout)
    assert fields["Seccomp"].strip() == "2"  # a filter: the runtime's default profile
    assert not int(fields["CapEff"], 16) & CAP_SYS_PTRACE
    uid_map = [
        line.split()
        for line in proc.stdout.splitlines()
        if len(line.split()) == 3 and all(f.isdigit() for f in line.split())
    ]
    if podman.rootless:  # root inside is the user outside, the rest its subordinate range
        assert uid_map[0] == ["0", str(pwd.getpwnam(USER).pw_uid), "1"], uid_map
    else:
        assert uid_map == [["0", "0", "4294967295"]]


# ---- the fixture as the entrypoint's CMD ----------------------------------------------------


def test_runners_get_the_preload_and_env(podman: Podman, images: Images) -> None:
    """Every runner gets the shim back, and the --env variable its parent stripped."""
    proc = podman.run(
        "-e",
        f"VGPU_LAUNCH_ENV=VGPU_TEST_DEVICES={DEVICES}",
        image=images.app,
        cmd=[OLLAMA, "serve", "--once"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runners = runner_lines(proc.stdout + proc.stderr)
    assert len(runners) == 4 and all(r.endswith(f"count={DEVICES}") for r in runners), runners
    assert f"initial_count={DEVICES}" in proc.stdout + proc.stderr
    events = _events(proc.stderr)
    execs = [e for e in events if e["event"] == "exec" and "runner" in e["argv"]]
    assert len(execs) == 4
    assert all(
        e["decision"] == "injected" and e["env_set"] == ["VGPU_TEST_DEVICES"] for e in execs
    ), execs
    (end,) = [e for e in events if e["event"] == "end"]
    assert end["counts"]["failed"] == 0 and end["cmd_exit"] == 0


def _pid_namespace(podman: Podman, name: str) -> str:
    pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    return os.readlink(f"/proc/{pid}/ns/pid")


def _left_in(namespace: str) -> list[int]:
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                    left.append(int(entry))
    return left


@contextlib.contextmanager
def serving(podman: Podman, images: Images, *extra: str) -> Iterator[str]:
    """A detached container running ``ollama serve``, once discovery is done; removed after."""
    name = f"vgpu-launch-test-{os.getpid()}-{'rootless' if podman.rootless else 'rootful'}"
    podman("rm", "-f", name, check=False)
    podman(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        *LIMITS,
        *extra,
        "-e",
        f"VGPU_LAUNCH_ENV=VGPU_TEST_DEVICES={DEVICES}",
        images.app,
    )
    try:

        def logs() -> str:
            proc = podman("logs", name, check=False)
            return proc.stdout + proc.stderr

        harness.wait_for(
            "discovery in the container",
            lambda: "initial_count=" in logs(),
            timeout=60,
            describe=lambda: logs()[-3000:],
        )
        yield name
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def test_podman_stop_is_a_clean_exit(podman: Podman, images: Images) -> None:
    """podman stop: SIGTERM reaches the server through vgpu-launch, exit 0, nothing left."""
    with serving(podman, images) as name:
        namespace = _pid_namespace(podman, name)
        podman("stop", "-t", "30", name, timeout=90)
        state = json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)
        logs = podman("logs", name).stderr
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (state, logs[-2000:])
        (end,) = [e for e in _events(logs) if e["event"] == "end"]
        assert end["cmd_exit"] == 0 and end["tracees_left"] == 0
        assert _left_in(namespace) == []


def test_podman_kill_reaps_the_container(images: Images) -> None:
    """podman kill -s KILL ends vgpu-launch (PID 1) and with it every process inside."""
    podman = images.podman
    with serving(podman, images) as name:
        namespace = _pid_namespace(podman, name)
        assert len(_left_in(namespace)) >= 2  # vgpu-launch and the server
        podman("kill", "-s", "KILL", name)
        code = podman("wait", name, timeout=60).stdout.strip()
        assert code == str(128 + signal.SIGKILL)
        assert podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip() == "exited"
        assert _left_in(namespace) == []


def test_cap_drop_all(images: Images) -> None:
    """With every capability dropped the tree is still followed and injected."""
    proc = images.podman.run(
        "--cap-drop=ALL",
        "-e",
        f"VGPU_LAUNCH_ENV=VGPU_TEST_DEVICES={DEVICES}",
        image=images.app,
        cmd=[OLLAMA, "serve", "--once"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runners = runner_lines(proc.stdout + proc.stderr)
    assert len(runners) == 4 and all(r.endswith(f"count={DEVICES}") for r in runners), runners


@pytest.fixture(scope="module")
def profile_without_ptrace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """podman's default seccomp profile (containers-common) with ptrace taken out."""
    profile = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    removed = 0
    for rule in profile["syscalls"]:
        if "ptrace" in rule.get("names", []):
            rule["names"] = [n for n in rule["names"] if n != "ptrace"]
            removed += 1
    assert removed, "the default profile no longer allows ptrace by name"
    profile["syscalls"] = [r for r in profile["syscalls"] if r.get("names")]
    path = tmp_path_factory.mktemp("seccomp") / "no-ptrace.json"
    path.write_text(json.dumps(profile))
    return path


def test_seccomp_profile_without_ptrace(images: Images, profile_without_ptrace: Path) -> None:
    """A profile without ptrace: exit 125 with one clear line, and doctor predicts it."""
    opt = f"seccomp={profile_without_ptrace}"
    proc = images.podman.run(
        "--security-opt", opt, image=images.app, cmd=[OLLAMA, "serve", "--once"]
    )
    assert proc.returncode == 125, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("vgpu-launch: ")]
    assert len(lines) == 1, proc.stderr
    assert "seccomp filter" in lines[0] and "refuses ptrace" in lines[0], lines[0]
    assert "runner pid=" not in proc.stdout + proc.stderr

    doctor = images.podman.run(
        "--security-opt",
        opt,
        "--entrypoint",
        "vgpu-launch",
        image=images.app,
        cmd=["doctor", "--format", "json"],
    )
    assert doctor.returncode != 0, doctor.stdout
    checks = {c["what"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["ptrace"]["status"] == "fail"
    assert "seccomp" in checks["ptrace"]["why"] and "ptrace" in checks["ptrace"]["fix"]
    # and without the profile, doctor passes the same check
    ok = images.podman.run(
        "--entrypoint", "vgpu-launch", image=images.app, cmd=["doctor", "--format", "json"]
    )
    checks = {c["what"]: c for c in json.loads(ok.stdout)["checks"]}
    assert checks["ptrace"]["status"] == "ok", checks["ptrace"]


# ---- a shim mounted from the host into a rootless container ---------------------------------


@pytest.fixture
def host_shims(images: Images, ollama_like: Any) -> Iterator[Path]:
    """A root-owned host directory with the shim in it, as HAMi's device plugin keeps its own."""
    d = Path(tempfile.mkdtemp(prefix="vgpu-launch-host-shims-"))
    d.chmod(0o755)
    shutil.copy(Path(ollama_like.dir) / "libvgpu-test-shim.so", d / "libvgpu.so")
    (d / "libvgpu.so").chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_rootless_shim_mounted_from_the_host(
    rootless: Podman, images: Images, host_shims: Path
) -> None:
    """Rootless, a root-owned host shim is refused while uid 65534 is mapped, accepted if not."""
    mount = [
        "-v",
        f"{host_shims}:/usr/local/vgpu:ro",
        "-e",
        f"VGPU_LAUNCH_ENV=VGPU_TEST_DEVICES={DEVICES}",
    ]
    refused = rootless.run(*mount, image=images.app, cmd=[OLLAMA, "serve", "--once"])
    assert refused.returncode == 2, refused.stderr
    assert "cannot be told apart" in refused.stderr and "map no user to uid" in refused.stderr

    # container uids 0-65533 only: the host's files show as the unmapped overflow uid
    accepted = rootless.run(
        *mount,
        "--uidmap",
        "0:0:65534",
        "--gidmap",
        "0:0:65534",
        image=images.app,
        cmd=[OLLAMA, "serve", "--once"],
    )
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    runners = runner_lines(accepted.stdout + accepted.stderr)
    assert len(runners) == 4 and all(r.endswith(f"count={DEVICES}") for r in runners), runners
    (start,) = [e for e in _events(accepted.stderr) if e["event"] == "start"]
    assert any("/usr/local/vgpu/libvgpu.so" in n for n in start["notes"]), start
