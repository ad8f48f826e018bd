"""A clean Debian 12 root, booted with systemd as PID 1 in namespaces of its own.

See ../shared/design/systemd.md.  The root is made once with debootstrap and cached in
``/var/cache/vgpu-launch-tests/bookworm-root`` (``VGPU_LAUNCH_TEST_CACHE`` moves it); it is
rebuilt when missing or made by an older version of this module.  Each boot runs on a
throwaway overlay over the cached root, so the cache itself is never written to.

What a booted system shares with the machine, and what it does not:

* its own PID, mount, UTS, IPC, network and cgroup namespaces; the mounts (overlay, /proc,
  /sys, /dev, /run, /tmp) exist only in its mount namespace and vanish with it;
* its own /dev (a tmpfs with the harmless device nodes bound in, a private devpts), so
  nothing it does lands in the machine's /dev; /proc/sys and /sys are read-only, so it cannot
  change kernel settings; modules, the clock and raw I/O are removed from its capabilities;
* a cgroup v2 subtree of its own (systemd runs in unified mode there), removed at the end;
* no network except loopback: commands that need Debian's archive (apt-get) are run with
  ``network=True``, which enters every namespace but the network one.

It is torn down by SIGKILL to its init, which takes every process of the namespace with it,
(1) in ``close()`` (the context manager and the pytest fixtures call it), (2) from a watchdog
thread after ``max_lifetime`` seconds, and (3) by the kernel if the test process dies
(``PR_SET_PDEATHSIG`` on ``unshare --kill-child``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from support import procs

T = TypeVar("T")

CACHE_DIR = Path(os.environ.get("VGPU_LAUNCH_TEST_CACHE", "/var/cache/vgpu-launch-tests"))
SUITE = "bookworm"
MIRROR = os.environ.get("VGPU_LAUNCH_TEST_MIRROR", "http://deb.debian.org/debian")
INCLUDE = "systemd,systemd-sysv,dbus,python3"
# Bump when prepare_root() changes: a cached root made by an older version is rebuilt.
ROOT_FORMAT = 1
STAMP = "etc/vgpu-launch-test-root"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# apt lists older than this are refreshed before packages are installed.
APT_LISTS_MAX_AGE = 12 * 3600

TOOLS = ("debootstrap", "unshare", "nsenter", "setpriv", "chroot", "mount")
# Capabilities the booted system has no business with (it shares the machine's kernel).
DROPPED_CAPS = (
    "sys_module",
    "sys_time",
    "sys_rawio",
    "syslog",
    "wake_alarm",
    "audit_control",
    "audit_read",
    "mac_admin",
    "mac_override",
)
# Units that would use the machine's console or kernel audit stream.
MASKED_UNITS = ("console-getty.service", "systemd-journald-audit.socket")


class HarnessError(RuntimeError):
    pass


def missing_requirements() -> list[str]:
    """Why a booted system cannot be had on this machine (empty: it can)."""
    why = []
    if os.geteuid() != 0:
        why.append("needs root")
    why += [f"{tool} not found" for tool in TOOLS if shutil.which(tool) is None]
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if "overlay" not in filesystems:
        why.append("no overlay filesystem")
    if cgroup2_mount() is None:
        why.append("no cgroup v2 hierarchy mounted")
    if not Path(f"/proc/self/task/{os.getpid()}/children").exists():
        why.append("kernel without /proc/PID/task/TID/children")
    return why


def cgroup2_mount() -> Path | None:
    """Where the machine's cgroup v2 hierarchy is mounted (unified or hybrid layout)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    return None


# --- the cached root ------------------------------------------------------------------------


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def root_path(cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / f"{SUITE}-root"


def _root_ok(root: Path) -> bool:
    try:
        return (root / STAMP).read_text().split() == [SUITE, str(ROOT_FORMAT)]
    except OSError:
        return False


def prepare_root(root: Path) -> None:
    """What the cached root gets on top of debootstrap (bump ROOT_FORMAT when this changes)."""
    units = root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    (root / "etc/hostname").write_text("vgpu-launch-test\n")
    (root / "etc/apt/apt.conf.d/90vgpu-launch-tests").write_text(
        'Acquire::Retries "3";\nAPT::Get::Assume-Yes "true";\n'
    )
    (root / STAMP).write_text(f"{SUITE} {ROOT_FORMAT}\n")


def ensure_root(
    cache_dir: Path = CACHE_DIR, *, log: Callable[[str], None] = print, timeout: float = 1200
) -> Path:
    """The cached clean root, made first if it is missing or stale (about 1 min, 300 MB)."""
    root = root_path(cache_dir)
    if _root_ok(root):
        return root
    with _flock(cache_dir / ".lock", fcntl.LOCK_EX):  # waits for systems still using it
        if _root_ok(root):
            return root
        new = cache_dir / f"{SUITE}-root.new"
        if new.exists():
            shutil.rmtree(new)
        log(f"debootstrap {SUITE} into {new} (once per machine)")
        t0 = time.monotonic()
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(new), MIRROR],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            shutil.rmtree(new, ignore_errors=True)
            raise HarnessError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
        prepare_root(new)
        if root.exists():
            shutil.rmtree(root)
        new.rename(root)
        log(f"root ready in {time.monotonic() - t0:.0f} s")
    return root


# --- a booted system ------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1

_BOOT_SCRIPT = r"""
set -eu
lower=$1 mnt=$2
mount -t tmpfs -o mode=0755 vgpu-launch-test "$mnt"
mkdir "$mnt/upper" "$mnt/work" "$mnt/root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$mnt/upper,workdir=$mnt/work" "$mnt/root"
r=$mnt/root
mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
mount --bind "$r/proc/sys" "$r/proc/sys"
mount -o remount,bind,ro "$r/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$r/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$r/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$r/tmp"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$r/dev"
for node in null zero full random urandom tty; do
    touch "$r/dev/$node"
    mount --bind "/dev/$node" "$r/dev/$node"
done
touch "$r/dev/console"
mount --bind /dev/null "$r/dev/console"
mkdir -m 0755 "$r/dev/pts" "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$r/dev/shm"
ln -s /proc/self/fd "$r/dev/fd"
ln -s /proc/self/fd/0 "$r/dev/stdin"
ln -s /proc/self/fd/1 "$r/dev/stdout"
ln -s /proc/self/fd/2 "$r/dev/stderr"
rm -f "$r/etc/resolv.conf"
cat /etc/resolv.conf >"$r/etc/resolv.conf" 2>/dev/null || :
hostname vgpu-launch-test
exec setpriv --bounding-set "$3" chroot "$r" /usr/bin/env -i container=vgpu-launch-test \
    /lib/systemd/systemd --system --show-status=no
"""


def _alive(pid: int) -> bool:
    return procs.state(pid) not in (None, "Z", "X")


def remove_stale_cgroups(base: Path, name: str = "vgpu-launch-test") -> None:
    """Remove the empty cgroups that systems of test processes killed outright left."""
    for old in base.glob(f"{name}.*"):
        try:
            pid = int(old.name.split(".")[-2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            for d in [
                *sorted(
                    (p for p in old.rglob("*") if p.is_dir()),
                    key=lambda p: len(p.parts),
                    reverse=True,
                ),
                old,
            ]:
                with contextlib.suppress(OSError):
                    d.rmdir()


class BootedSystem:
    """A Debian root booted with systemd as PID 1; run commands in it with ``run()``."""

    def __init__(
        self,
        lower: Path,
        *,
        name: str = "vgpu-launch-test",
        boot_timeout: float = 90,
        max_lifetime: float = 1800,
        log_dir: Path | None = None,
        keep_logs: bool = False,
    ) -> None:
        self.lower = lower
        self.name = name
        self.boot_timeout = boot_timeout
        self.max_lifetime = max_lifetime
        self.keep_logs = keep_logs
        self._tmp = Path(tempfile.mkdtemp(prefix="vgpu-launch-system.", dir=log_dir))
        self.console_log = self._tmp / "console.log"
        self._mnt = self._tmp / "mnt"
        self._mnt.mkdir()
        base = cgroup2_mount()
        if base is None:
            raise HarnessError("no cgroup v2 hierarchy")
        self._cgroup = base / f"{name}.{os.getpid()}.{int(time.time() * 1000)}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: Any = None
        self._watchdog: threading.Timer | None = None
        self.init_pid: int | None = None
        self._apt_updated = False

    # -- life cycle

    def __enter__(self) -> BootedSystem:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(self) -> None:
        remove_stale_cgroups(self._cgroup.parent, self.name)
        lock_path = self.lower.parent / ".lock"
        self._lock = open(lock_path, "a")  # noqa: SIM115 - held for the system's lifetime
        fcntl.flock(self._lock, fcntl.LOCK_SH)  # a rebuild of the cache waits for us
        self._cgroup.mkdir()
        cgroup_procs = str(self._cgroup / "cgroup.procs")

        def in_child() -> None:  # runs between fork and exec
            with open(cgroup_procs, "w") as f:
                f.write("0")
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        caps = ",".join("-" + c for c in DROPPED_CAPS)
        log = open(self.console_log, "wb")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [
                    "unshare",
                    "--kill-child=SIGKILL",
                    "--fork",
                    "--pid",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--net",
                    "--cgroup",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    _BOOT_SCRIPT,
                    "boot",
                    str(self.lower),
                    str(self._mnt),
                    caps,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=in_child,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        finally:
            log.close()
        self._watchdog = threading.Timer(self.max_lifetime, self._kill)
        self._watchdog.daemon = True
        self._watchdog.start()

        deadline = time.monotonic() + self.boot_timeout
        while self.init_pid is None:
            self._check_alive("before systemd started")
            kids = procs.children(self._proc.pid)
            if kids:
                self.init_pid = kids[0]
            elif time.monotonic() > deadline:
                raise HarnessError("unshare did not start its child\n" + self.console_tail())
            else:
                time.sleep(0.02)
        # wait until PID 1 is systemd inside the root, then until it has booted
        while True:
            self._check_alive("while booting")
            try:
                exe = os.readlink(f"/proc/{self.init_pid}/exe")
                chrooted = os.readlink(f"/proc/{self.init_pid}/root") != "/"
            except OSError:
                exe, chrooted = "", False
            if chrooted and exe.endswith("/systemd"):
                break
            if time.monotonic() > deadline:
                raise HarnessError("systemd did not start\n" + self.console_tail())
            time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            self._check_alive("while booting")
            state = self.run("systemctl", "is-system-running", check=False, timeout=10).stdout
            state = state.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise HarnessError(
            f"system not up after {self.boot_timeout} s (is-system-running: {state!r})\n"
            + self.run("systemctl", "list-jobs", "--no-pager", check=False).stdout
            + self.console_tail()
        )

    def _check_alive(self, when: str) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise HarnessError(
                f"the namespace died {when} (exit {self._proc.returncode})\n" + self.console_tail()
            )

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "--- console ---\n" + "\n".join(text.splitlines()[-lines:])

    def _kill(self) -> None:
        """SIGKILL to the namespace's init (the kernel then kills every process in it);
        ``unshare`` reaps it and exits by itself."""
        pid = self.init_pid
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        elif pid is None and self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # died before its child was known: --kill-child takes the child

    def close(self, timeout: float = 30) -> None:
        """Kill the namespace (every process in it) and remove what it left; bounded in time."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._kill()
        deadline = time.monotonic() + timeout
        if self._proc is not None:
            try:
                self._proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if self.init_pid is not None:
            while _alive(self.init_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._remove_cgroup(deadline)
        with contextlib.suppress(OSError):
            self._mnt.rmdir()  # the tmpfs on it existed only in the namespace
        if not self.keep_logs:
            shutil.rmtree(self._tmp, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _remove_cgroup(self, deadline: float) -> None:
        if not self._cgroup.exists():
            return
        kill = self._cgroup / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        while True:
            dirs = sorted(
                (p for p in self._cgroup.rglob("*") if p.is_dir()),
                key=lambda p: len(p.parts),
                reverse=True,
            )
            try:
                for d in [*dirs, self._cgroup]:
                    d.rmdir()
                return
            except FileNotFoundError:
                continue
            except OSError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"cgroup {self._cgroup} could not be removed") from None
                time.sleep(0.1)

    # -- commands inside

    def nsenter(self, *, network: bool = False) -> list[str]:
        """The command prefix that enters this system (root, cwd /, a clean environment).

        ``network=True`` keeps the machine's network namespace (to reach Debian's archive).
        """
        if self.init_pid is None:
            raise HarnessError("not booted")
        spaces = ["-m", "-u", "-i", "-p", "-C"] if network else ["-a"]
        return [
            "nsenter",
            "-t",
            str(self.init_pid),
            *spaces,
            "-r",
            "-w",
            "--",
            "/usr/bin/env",
            "-i",
            f"PATH={GUEST_PATH}",
            "LANG=C.UTF-8",
            "HOME=/root",
            "TERM=dumb",
            "DEBIAN_FRONTEND=noninteractive",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
        ]

    def run(
        self,
        *argv: str,
        input: str | bytes | None = None,
        timeout: float = 60,
        check: bool = True,
        network: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGV inside; stdout and stderr come back as text."""
        data = input.encode() if isinstance(input, str) else input
        try:
            proc = subprocess.run(
                [*self.nsenter(network=network), *argv],
                input=data,
                stdin=None if data is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(
                f"timed out after {timeout} s inside the system: {shlex.join(argv)}"
            ) from exc
        result = subprocess.CompletedProcess(
            proc.args,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"exit {result.returncode} inside the system: {shlex.join(argv)}\n"
                f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
            )
        return result

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-ec", script, **kw)

    def write(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Create or replace a file inside (parent directories made, owned by root)."""
        self.run(
            "/bin/sh",
            "-ec",
            'mkdir -p "$(dirname "$1")"; cat >"$1"; chmod "$2" "$1"',
            "write",
            path,
            format(mode, "o"),
            input=content,
        )

    def copy_in(self, src: Path, path: str, mode: int | None = None) -> None:
        if mode is None:
            mode = src.stat().st_mode & 0o7777
        self.write(path, src.read_bytes(), mode)

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    def refresh_apt_lists(self, timeout: float = 300) -> None:
        """apt-get update inside, once, if the cached root's package lists are stale."""
        if self._apt_updated:
            return
        lists = sorted(self.lower.glob("var/lib/apt/lists/*_InRelease"))
        if not lists or time.time() - lists[0].stat().st_mtime > APT_LISTS_MAX_AGE:
            self.run("apt-get", "-q", "update", network=True, timeout=timeout)
        self._apt_updated = True

    def apt_get(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """apt-get inside, with the network."""
        self.refresh_apt_lists()
        return self.run("apt-get", "-q", "-y", *args, network=True, timeout=timeout)

    # -- systemd

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """Journal entries (journalctl -o json), e.g. ``journal("-u", "x.service")``."""
        out = self.run("journalctl", "--no-pager", "-o", "json", "--all", *args, timeout=60).stdout
        entries = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def journal_text(self, *args: str) -> str:
        return self.run(
            "journalctl", "--no-pager", "-o", "short-monotonic", "--all", *args, check=False
        ).stdout

    def processes(self) -> list[dict[str, Any]]:
        """pid, ppid, uid, comm and argv of every process in the system (read from /proc)."""
        script = (
            "import json,os\n"
            "out=[]\n"
            "for p in os.listdir('/proc'):\n"
            "  if not p.isdigit(): continue\n"
            "  try:\n"
            "    st=open(f'/proc/{p}/status').read()\n"
            "    argv=open(f'/proc/{p}/cmdline','rb').read().split(b'\\0')[:-1]\n"
            "  except OSError: continue\n"
            "  f=dict(l.split(':\\t',1) for l in st.splitlines() if ':\\t' in l)\n"
            "  out.append({'pid':int(p),'ppid':int(f['PPid']),'uid':int(f['Uid'].split()[0]),"
            "'comm':f['Name'],'argv':[a.decode(errors='replace') for a in argv]})\n"
            "print(json.dumps(out))\n"
        )
        procs: list[dict[str, Any]] = json.loads(self.run("python3", "-c", script).stdout)
        return procs


def wait_for(
    what: str,
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.25,
    describe: Callable[[], str] | None = None,
) -> T:
    """support.procs.wait_for, polling less often by default: each look into a booted system
    runs a command in it."""
    return procs.wait_for(what, predicate, timeout, interval, describe)


def boot(lower: Path | None = None, **kw: Any) -> BootedSystem:
    """Boot the cached root (made first if needed); use as a context manager."""
    return BootedSystem(lower or ensure_root(), **kw)


def build_deb(outdir: Path, top: Path, *, timeout: float = 600) -> Path:
    """packaging/build-deb.sh OUTDIR; the path of the .deb it made."""
    proc = subprocess.run(
        [str(top / "packaging/build-deb.sh"), str(outdir)],
        cwd=top,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise HarnessError(
            f"build-deb.sh failed ({proc.returncode}):\n"
            f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        )
    debs = sorted(outdir.glob("vgpu-launch_*_all.deb"))
    if len(debs) != 1:
        raise HarnessError(f"expected one .deb in {outdir}, found {debs}")
    return debs[0]


def install_deb(system: BootedSystem, deb: Path) -> subprocess.CompletedProcess[str]:
    """Copy the .deb into the system and ``apt-get install`` it there, as an operator would
    (its dependencies come from Debian's archive)."""
    system.copy_in(deb, f"/root/{deb.name}", 0o644)
    system.refresh_apt_lists()
    return system.run(
        "/bin/sh",
        "-ec",
        "cd /root && apt-get -q -y install ./vgpu-launch_*.deb",
        network=True,
        timeout=300,
    )


__all__: Sequence[str] = (
    "CACHE_DIR",
    "BootedSystem",
    "HarnessError",
    "boot",
    "build_deb",
    "ensure_root",
    "install_deb",
    "missing_requirements",
    "wait_for",
)
