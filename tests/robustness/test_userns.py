"""The ownership rule inside a user namespace (vgpu_launch/security.py, docs/security.md).

In a user namespace a file whose owner is not mapped into it shows as owned by the overflow uid
(``nobody``): the host's own files, and shims bind-mounted from the host. Nobody in the
namespace can act as that owner, so vgpu-launch accepts such a path without --allow-insecure
and notes it in the start event; a path that group or others can write is still refused, with
a fix that can be carried out (chmod where the file comes from, not chown inside).

Every test runs vgpu-launch in a real user namespace: as a non-root user with
``unshare -Urpf --mount-proc`` (the way rootless containers, bwrap and firejail make one), or,
for the case where a namespace maps a user to the overflow uid (rootless podman's default), as
root with a uid map written the way newuidmap writes it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from support import launch, procs
from support.build import Programs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setpriv)")

# A uid and gid with no account: an unprivileged user that owns nothing on this machine.
USER = 4243
AS_USER = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", "--"]
OVERFLOW = int(Path("/proc/sys/kernel/overflowuid").read_text())


def _userns_works() -> str | None:
    proc = subprocess.run(
        [*AS_USER, "unshare", "-Urpf", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if proc.returncode == 0 else proc.stderr.strip()


@pytest.fixture(scope="module", autouse=True)
def _need_userns() -> None:
    why = _userns_works()
    if why is not None:
        pytest.fail(f"unprivileged user namespaces do not work here: {why}", pytrace=False)


def host_dir(pub: Path, name: str, programs: Programs, mode: int = 0o644, gid: int = 0) -> Path:
    """A root-owned directory of the host with the test shim in it (``mode``, group ``gid``)."""
    d = pub / name
    d.mkdir(mode=0o755)
    lib = d / "librobustmark.so"
    shutil.copy(programs.librobustmark, lib)
    os.chown(lib, 0, gid)
    lib.chmod(mode)
    return d


def run_in_userns(
    script: str, *, prefix: Sequence[str] | None = None, timeout: float = 60
) -> launch.LaunchResult:
    """``sh -c SCRIPT`` as the test user in ``unshare -Urpf --mount-proc`` (or after
    ``prefix``); $VGPU is a copy of the launcher that user can read. Nothing may be left."""
    launcher = str(launch.public_launcher())
    argv = [
        *(prefix if prefix is not None else [*AS_USER, "unshare", "-Urpf", "--mount-proc"]),
        "sh",
        "-c",
        f"VGPU={shlex.quote(launcher)}\n{script}",
    ]
    env = launch.clean_env({"VGPU_LAUNCH_PYTHON": launch.SYSTEM_PYTHON})
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        left = procs.kill_session(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(
            f"did not finish within {timeout} s; killed {left}\n" + err.decode(errors="replace")
        ) from None
    left = procs.kill_session(proc.pid)
    run = launch.LaunchResult(
        argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
    assert not left, f"processes left behind: {left}\n{run.describe()}"
    return run


def start_event(run: launch.LaunchResult) -> dict[str, object]:
    (start,) = run.of("start")
    return start


def test_shim_bind_mounted_from_a_root_owned_host_directory_is_accepted(
    programs: Programs, pub: Path
) -> None:
    """A non-root user's namespace accepts a shim bind-mounted from root's directory."""
    shims = host_dir(pub, "host-shims", programs)
    target = pub / "mnt"
    target.mkdir(mode=0o755)
    lib = target / "librobustmark.so"
    run = run_in_userns(f"""
        mount --bind {shims} {target}
        exec "$VGPU" --log-format json --preload {lib} -- {programs.rprobe}
    """)
    assert run.returncode == 0, run.describe()
    assert "marker=1" in run.stdout and "uid=0" in run.stdout, run.describe()
    notes = start_event(run)["notes"]
    assert isinstance(notes, list) and len(notes) == 1, run.describe()
    assert notes[0].startswith(f"preload library {lib}: accepted /, ")
    assert f"{target}, {lib}, owned by uid {OVERFLOW} (the overflow uid" in notes[0]
    assert "insecure_accepted" not in start_event(run)


def test_configuration_file_of_the_host_is_accepted(programs: Programs, pub: Path) -> None:
    """A root-owned configuration file read inside the namespace is accepted and noted."""
    shims = host_dir(pub, "host-shims", programs)
    conf = pub / "vgpu-launch.conf"
    conf.write_text(f'preload = ["{shims / "librobustmark.so"}"]\n[env]\nVGPU_TEST_LIMIT = "8g"\n')
    conf.chmod(0o644)
    run = run_in_userns(f"""
        exec "$VGPU" --log-format json --config {conf} -- {programs.rprobe} --env0
    """)
    assert run.returncode == 0, run.describe()
    assert "VGPU_TEST_LIMIT=8g\0" in run.stdout, run.describe()
    notes = start_event(run)["notes"]
    assert isinstance(notes, list)
    assert any(n.startswith(f"configuration file {conf}: accepted ") for n in notes), notes
    assert any(n.startswith("preload library ") for n in notes), notes


def test_world_writable_shim_inside_the_namespace_is_refused(programs: Programs, pub: Path) -> None:
    """A world-writable shim is still refused, with a fix that works from inside."""
    shims = host_dir(pub, "host-shims", programs, mode=0o666)
    target = pub / "mnt"
    target.mkdir(mode=0o755)
    ran = pub / "ran"
    lib = target / "librobustmark.so"
    run = run_in_userns(f"""
        mount --bind {shims} {target}
        exec "$VGPU" --preload {lib} -- {programs.rprobe} --touch {ran}
    """)
    assert run.returncode == 2, run.describe()
    (line,) = run.stderr.splitlines()
    assert line.startswith(
        f"vgpu-launch: refusing preload library {lib} (from command line): "
        f"file {lib} (mode 0666, owner nobody:"
    ), line
    assert "a user outside this user namespace) is writable by every user" in line
    assert f"run code as root of this user namespace (uid {USER} outside it)" in line
    assert "chmod go-w on the host" in line and "--allow-insecure" in line
    assert "owned by root" not in line  # chown is impossible in here
    assert not ran.exists()


def test_group_writable_shim_of_an_unmapped_group_is_refused(programs: Programs, pub: Path) -> None:
    """Group write on a group not mapped into the namespace is refused (root's group too)."""
    shims = host_dir(pub, "host-shims", programs, mode=0o664, gid=0)
    run = run_in_userns(f'exec "$VGPU" --preload {shims}/librobustmark.so -- true')
    assert run.returncode == 2, run.describe()
    assert "mode 0664" in run.stderr and "is writable by group" in run.stderr, run.describe()


def test_allow_insecure_reports_what_it_accepted(programs: Programs, pub: Path) -> None:
    """--allow-insecure still works inside, and the start event says what it let through."""
    shims = host_dir(pub, "host-shims", programs, mode=0o666)
    run = run_in_userns(f"""
        exec "$VGPU" --log-format json --allow-insecure --preload {shims}/librobustmark.so \\
            -- {programs.rprobe}
    """)
    assert run.returncode == 0 and "marker=1" in run.stdout, run.describe()
    accepted = start_event(run)["insecure_accepted"]
    assert isinstance(accepted, list) and "mode 0666" in accepted[0], run.describe()


def test_doctor_inside_proposes_no_chown(programs: Programs, pub: Path) -> None:
    """doctor in the namespace: the outside-owned shim passes; a writable one gets a chmod fix."""
    good = host_dir(pub, "good", programs)
    bad = host_dir(pub, "bad", programs, mode=0o666)
    run = run_in_userns(f"""
        "$VGPU" doctor --format json --preload {good}/librobustmark.so
        echo "%%"
        "$VGPU" doctor --format json --preload {bad}/librobustmark.so
        true
    """)
    docs = [json.loads(part) for part in run.stdout.split("%%\n")]
    assert len(docs) == 2, run.describe()

    def permissions(doc: dict[str, object]) -> dict[str, str]:
        checks = doc["checks"]
        assert isinstance(checks, list)
        (check,) = [c for c in checks if str(c["what"]).endswith(": permissions")]
        return check  # type: ignore[no-any-return]

    assert permissions(docs[0])["status"] == "ok", docs[0]
    bad_check = permissions(docs[1])
    assert bad_check["status"] == "fail", bad_check
    assert "chmod go-w PATH on the host" in bad_check["fix"]
    assert "chown" not in bad_check["fix"]


# ---- a namespace that maps a user to the overflow uid ----------------------------------------


def mapped_overflow_prefix(tmp: Path) -> list[str]:
    """Run as uid 0 of a namespace mapping 0-65535 to 100000-165535, as rootless podman does:
    uid 65534 inside is a user of the namespace, and root's files show as 65534 too."""
    helper = tmp / "mapns.py"
    helper.write_text(MAPNS)
    return [launch.SYSTEM_PYTHON, str(helper)]


MAPNS = r"""
import ctypes, os, sys
# The child enters a new user namespace; the parent (root) writes its maps from outside, as
# newuidmap would; then the child becomes uid 0 there before any exec (an exec as an unmapped
# uid would drop its capabilities in the namespace).
CLONE_NEWUSER = 0x10000000
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
        os._exit(120)
    os.write(ready_w, b"u")
    os.read(go_r, 1)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    os.execvp("unshare", ["unshare", "-pf", "--mount-proc", *sys.argv[1:]])
os.read(ready_r, 1)
for kind in ("uid", "gid"):
    with open(f"/proc/{pid}/{kind}_map", "w") as f:
        f.write("0 100000 65536\n")
os.write(go_w, b"g")
status = os.waitpid(pid, 0)[1]
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_overflow_uid_mapped_to_a_user_is_refused(programs: Programs, pub: Path) -> None:
    """Where a user is mapped to the overflow uid, a host file cannot be told from theirs."""
    shims = host_dir(pub, "host-shims", programs)
    run = run_in_userns(
        f"""
        cat /proc/self/uid_map >&2
        exec "$VGPU" --preload {shims}/librobustmark.so -- true
    """,
        prefix=mapped_overflow_prefix(pub),
    )
    assert "0     100000      65536" in run.stderr, run.describe()
    assert run.returncode == 2, run.describe()
    line = run.stderr.splitlines()[-1]
    assert line.startswith("vgpu-launch: refusing preload library ")
    assert f"directory / (mode 0755, owner {OVERFLOW}" in line or "owner nobody" in line, line
    assert "is also the overflow uid" in line and "cannot be told apart" in line, line
    assert "uid 100000 outside it" in line
    assert f"map no user to uid {OVERFLOW} in this user namespace" in line


def test_host_user_nobody_is_still_refused_outside_any_namespace(
    programs: Programs, pub: Path
) -> None:
    """On the host, a file owned by nobody (the overflow uid's account) is still refused."""
    shims = host_dir(pub, "host-shims", programs)
    os.chown(shims / "librobustmark.so", OVERFLOW, OVERFLOW)
    run = launch.run(["--preload", str(shims / "librobustmark.so"), "--", "true"], log_format=None)
    assert run.returncode == 2, run.describe()
    assert "is owned by nobody, not root" in run.stderr
    assert "outside this user namespace" not in run.stderr
