"""``vgpu-launch doctor`` against good and broken set-ups: each problem is named with its fix,
and the exit status is 0 only when nothing fails.

A unit under a real systemd is exercised by tests/system; here ``--unit`` reads a fake
``systemctl`` on PATH that prints what ``systemctl show`` would.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from support import systemctl
from support.build import Programs
from support.launch import LAUNCHER, clean_env

from vgpu_launch.diagnostics import libcheck

# Whether this host has a 32-bit loader: then a 64-bit-only library is worth a warning.
HAS32 = libcheck.token_values(4) is not None

SECCOMP_WRAPPER = r'''
"""Run ARGV under a seccomp filter that makes ptrace fail with EPERM."""
import ctypes, os, platform, sys

AUDIT = {"x86_64": (0xC000003E, 101), "aarch64": (0xC00000B7, 117)}
arch, nr = AUDIT[platform.machine()]


class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]


class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]


insns = (Insn * 6)(
    Insn(0x20, 0, 0, 4),                # ld arch
    Insn(0x15, 0, 3, arch),             # jeq native, else allow
    Insn(0x20, 0, 0, 0),                # ld nr
    Insn(0x15, 0, 1, nr),               # jeq ptrace
    Insn(0x06, 0, 0, 0x00050000 | 1),   # ret ERRNO(EPERM)
    Insn(0x06, 0, 0, 0x7FFF0000),       # ret ALLOW
)
prog = Prog(len(insns), insns)
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
    sys.exit("PR_SET_NO_NEW_PRIVS: " + os.strerror(ctypes.get_errno()))
if libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0)):
    sys.exit("PR_SET_SECCOMP: " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[1], sys.argv[1:])
'''


@pytest.fixture(scope="module")
def libs(programs: Programs) -> dict[str, str]:
    """The libraries doctor looks at, by role."""
    return {
        "dir": programs.dir,
        "lib": programs.libshim,
        "lib32": programs.libshim32,
        "aborts": programs.libaborts,
        "needs": programs.libneeds,
        "token": programs.shim_lib_token,
    }


@pytest.fixture(autouse=True)
def _empty_config(empty_config: str) -> None:
    EMPTY_CONFIG[0] = empty_config


EMPTY_CONFIG = [""]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # no host configuration leaks into the tests
    return clean_env({"VGPU_LAUNCH_CONFIG": EMPTY_CONFIG[0], **(extra or {})})


class Result:
    def __init__(self, rc: int, checks: list[dict[str, str]], stdout: str, stderr: str) -> None:
        self.rc = rc
        self.checks = checks
        self.stdout = stdout
        self.stderr = stderr

    def find(self, what: str) -> list[dict[str, str]]:
        return [c for c in self.checks if c["what"] == what]

    def one(self, what: str) -> dict[str, str]:
        found = self.find(what)
        assert len(found) == 1, f"{what!r} in {self.describe()}"
        return found[0]

    def status_of(self, what: str) -> str:
        return self.one(what)["status"]

    def failures(self) -> list[dict[str, str]]:
        return [c for c in self.checks if c["status"] == "fail"]

    def describe(self) -> str:
        lines = [f"{c['status']:4} {c['what']}: {c['why']} {c['fix']}" for c in self.checks]
        return f"exit {self.rc}\n" + "\n".join(lines) + f"\n{self.stderr}"


def doctor(
    *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> Result:
    argv = [*(prefix or []), str(LAUNCHER), "doctor", *args, "--format", "json"]
    proc = subprocess.run(
        argv, env=env or _env(), capture_output=True, text=True, timeout=120, check=False
    )
    try:
        checks = json.loads(proc.stdout)["checks"]
    except (ValueError, KeyError):
        pytest.fail(f"$ {' '.join(argv)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    res = Result(proc.returncode, checks, proc.stdout, proc.stderr)
    data = json.loads(proc.stdout)
    assert data["ok"] == (proc.returncode == 0) == (not res.failures()), res.describe()
    return res


# ---------------------------------------------------------------------------------------------
# good set-ups


def test_good_64bit_library(libs: dict[str, str]) -> None:
    """A good 64-bit library: ptrace, the file, its permissions and its loading are ok."""
    r = doctor("--preload", libs["lib"])
    assert r.rc == 0, r.describe()
    assert r.status_of("ptrace") == "ok"
    assert "traced through its exec" in r.one("ptrace")["why"]
    lib = r.one(f"library {libs['lib']}")
    assert lib["status"] == "ok" and "covers 64-bit programs" in lib["why"]
    assert r.status_of(f"library {libs['lib']}: permissions") == "ok"
    loads = r.one(f"library {libs['lib']}: loads (64-bit)")
    assert loads["status"] == "ok" and "mapped" in loads["why"], r.describe()
    if HAS32:  # a 32-bit loader exists, but no 32-bit program was found: a note
        w = r.one(f"library {libs['lib']}: 32-bit")
        assert w["status"] == "note" and "$LIB" in w["fix"], r.describe()
        assert "no 32-bit program was found" in w["why"]
    cfg = r.one("config: preload")
    assert cfg["status"] == "ok" and "command line" in cfg["why"]


def test_good_lib_token_both_word_sizes(libs: dict[str, str]) -> None:
    """A $LIB library with both builds covers and loads in 64- and 32-bit programs."""
    if not HAS32:
        pytest.skip("no 32-bit loader on this host")
    r = doctor("--preload", libs["token"])
    assert r.rc == 0, r.describe()
    assert "covers 64-bit and 32-bit programs" in r.one(f"library {libs['token']}")["why"]
    assert r.status_of(f"library {libs['token']}: loads (64-bit)") == "ok"
    assert r.status_of(f"library {libs['token']}: loads (32-bit)") == "ok", r.describe()
    assert not r.find(f"library {libs['token']}: 32-bit")


def test_text_format(libs: dict[str, str]) -> None:
    """The text report: one line per check, then the count of failures."""
    proc = subprocess.run(
        [str(LAUNCHER), "doctor", "--preload", libs["lib"]],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ok    ptrace ")
    assert all(ln.split()[0] in ("ok", "note", "warn", "fail") for ln in lines[:-1])
    assert lines[-1].startswith("0 failed, 0 warnings, ")


# ---------------------------------------------------------------------------------------------
# broken libraries


def test_missing_file(libs: dict[str, str]) -> None:
    """A library that does not exist fails, with a fix."""
    path = f"{libs['dir']}/nothere/libshim.so"
    r = doctor("--preload", path)
    assert r.rc == 1, r.describe()
    c = r.one(f"library {path}")
    assert c["status"] == "fail" and "not found" in c["why"] and c["fix"]


def test_wrong_machine_type(libs: dict[str, str]) -> None:
    """A 32-bit library as the only preload: no 64-bit program can load it."""
    r = doctor("--preload", libs["lib32"])
    assert r.rc == 1, r.describe()
    c = r.one(f"library {libs['lib32']}")
    assert c["status"] == "fail"
    assert "32-bit" in c["why"] and "64-bit programs" in c["why"]


def test_world_writable_file(libs: dict[str, str], tmp_path: Path) -> None:
    """A world-writable library fails its permissions check (a warning when allowed)."""
    d = tmp_path / "shim"
    d.mkdir()
    d.chmod(0o755)
    lib = d / "libshim.so"
    shutil.copy(libs["lib"], lib)
    lib.chmod(0o666)
    r = doctor("--preload", str(lib))
    assert r.rc == 1, r.describe()
    c = r.one(f"library {lib}: permissions")
    assert c["status"] == "fail"
    assert f"file {lib} (mode 0666, owner" in c["why"] and "writable by every user" in c["why"]
    assert "chmod go-w" in c["fix"]
    # the library itself is fine otherwise: its other checks still run
    assert r.status_of(f"library {lib}") == "ok"
    # an explicit override turns it into a warning, as vgpu-launch would then accept it
    r = doctor("--preload", str(lib), env=_env({"VGPU_LAUNCH_ALLOW_INSECURE": "1"}))
    c = r.one(f"library {lib}: permissions")
    assert c["status"] == "warn" and "VGPU_LAUNCH_ALLOW_INSECURE" in c["why"], r.describe()


def test_group_writable_directory(libs: dict[str, str], tmp_path: Path) -> None:
    """A directory above the library that a group with other members can write."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another group")
    d = tmp_path / "shared"
    d.mkdir()
    os.chown(d, 0, 65534)  # nogroup: nobody is in it
    d.chmod(0o775)
    lib = d / "libshim.so"
    shutil.copy(libs["lib"], lib)
    lib.chmod(0o644)
    r = doctor("--preload", str(lib))
    c = r.one(f"library {lib}: permissions")
    assert c["status"] == "fail" and f"directory {d} (mode 0775" in c["why"], r.describe()
    assert "writable by group" in c["why"]


def test_ldso_refusal_is_reported(libs: dict[str, str]) -> None:
    """The library needs a library that is gone: ld.so's own words come back."""
    r = doctor("--preload", libs["needs"])
    assert r.rc == 1, r.describe()
    c = r.one(f"library {libs['needs']}: loads (64-bit)")
    assert c["status"] == "fail"
    assert "libdep.so" in c["why"] and "cannot open shared object file" in c["why"]


def test_constructor_crash(libs: dict[str, str]) -> None:
    """A library whose constructor crashes fails its load check, naming the signal."""
    r = doctor("--preload", libs["aborts"])
    c = r.one(f"library {libs['aborts']}: loads (64-bit)")
    assert c["status"] == "fail" and "SIGABRT" in c["why"], r.describe()


# ---------------------------------------------------------------------------------------------
# ptrace refused


def test_ptrace_refused_by_seccomp(libs: dict[str, str], tmp_path: Path) -> None:
    """ptrace refused by a seccomp filter fails, naming seccomp and the fix."""
    wrapper = tmp_path / "noptrace.py"
    wrapper.write_text(SECCOMP_WRAPPER)
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("seccomp wrapper knows x86_64 and aarch64")
    r = doctor("--preload", libs["lib"], prefix=[sys.executable, str(wrapper)])
    assert r.rc == 1, r.describe()
    p = r.one("ptrace")
    assert p["status"] == "fail" and "EPERM" in p["why"] and "seccomp" in p["why"]
    assert "seccomp" in p["fix"]
    s = r.one("ptrace: seccomp")
    assert s["status"] == "fail" and "refuses ptrace" in s["why"]
    # the libraries are still checked
    assert r.status_of(f"library {libs['lib']}: loads (64-bit)") == "ok"


def test_ptrace_that_kills_is_reported_not_suffered(
    libs: dict[str, str], programs: Programs
) -> None:
    """Under a filter that kills ptrace callers (SIGSYS), doctor survives and fails the check
    with the reason the launcher would give."""
    r = doctor("--preload", libs["lib"], prefix=[programs.seccomp_ptrace, "kill"])
    assert r.rc == 1, r.describe()
    p = r.one("ptrace")
    assert p["status"] == "fail" and "kills any process that calls ptrace" in p["why"]
    assert "125" in p["fix"]
    # the libraries are still checked
    assert r.status_of(f"library {libs['lib']}: loads (64-bit)") == "ok"


def test_ptrace_refused_under_second_tracer(libs: dict[str, str]) -> None:
    """Under another tracer (strace), ptrace fails, naming that tracer."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is needed for this test (apt-get install strace)", pytrace=False)
    r = doctor("--preload", libs["lib"], prefix=[strace, "-f", "-o", "/dev/null"])
    assert r.rc == 1, r.describe()
    p = r.one("ptrace")
    assert p["status"] == "fail" and "strace" in p["why"], r.describe()
    assert "already traced" in p["why"]
    t = r.one("ptrace: tracer")
    assert t["status"] == "fail" and "strace" in t["why"]


# ---------------------------------------------------------------------------------------------
# configuration


def test_configuration_sources(libs: dict[str, str], tmp_path: Path) -> None:
    """Each setting is reported with the place it comes from."""
    conf = tmp_path / "vgpu-launch.conf"
    conf.write_text('exclude = ["nvidia-smi"]\n[env]\nCUDA_DEVICE_SM_LIMIT = "50"\n')
    r = doctor(env=_env({"VGPU_LAUNCH_PRELOAD": libs["lib"], "VGPU_LAUNCH_CONFIG": str(conf)}))
    assert r.rc == 0, r.describe()
    assert "from VGPU_LAUNCH_PRELOAD" in r.one("config: preload")["why"]
    assert f"from file {conf}" in r.one("config: exclude")["why"]
    assert "CUDA_DEVICE_SM_LIMIT" in r.one("config: env")["why"]
    assert str(conf) in r.one("config: file")["why"]


def test_bad_configuration(tmp_path: Path) -> None:
    """A bad configuration file fails, naming the bad key."""
    conf = tmp_path / "bad.conf"
    conf.write_text("no_such_key = 1\n")
    r = doctor(env=_env({"VGPU_LAUNCH_CONFIG": str(conf)}))
    assert r.rc == 1
    c = r.one("config")
    assert c["status"] == "fail" and "no_such_key" in c["why"]


def test_nothing_configured() -> None:
    """No preload configured anywhere fails, pointing at --preload."""
    r = doctor()
    assert r.rc == 1
    c = r.one("config: preload")
    assert c["status"] == "fail" and "--preload" in c["fix"]


# ---------------------------------------------------------------------------------------------
# --unit, against a fake systemctl


def _exec(argv: str) -> str:
    path = argv.split()[0]
    return (
        f"{{ path={path} ; argv[]={argv} ; ignore_errors=no ; start_time=[n/a] ; "
        "stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }"
    )


SYSTEM_SERVICE = (
    "_llseek accept accept4 access brk capget clone clone3 close execve exit "
    "exit_group fork getpid kill mmap munmap openat prctl read wait4 waitid write"
)


def _unit_env(tmp_path: Path, units: dict[str, dict[str, Any]], fail: str = "") -> dict[str, str]:
    systemctl.install(tmp_path / "bin", units, fail)
    return _env({"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})


def test_unit_good(libs: dict[str, str], tmp_path: Path) -> None:
    """A well-set-up unit: every unit check is ok and the unit's settings are used."""
    envfile = tmp_path / "ollama.env"
    envfile.write_text('# shim settings\nCUDA_DEVICE_MEMORY_LIMIT_0="8g"\n')
    env = _unit_env(
        tmp_path,
        {
            "ollama.service": {
                "Id": "ollama.service",
                "LoadState": "loaded",
                "ActiveState": "active",
                "FragmentPath": "/etc/systemd/system/ollama.service",
                "DropInPaths": "/etc/systemd/system/ollama.service.d/vgpu-launch.conf",
                "Type": "simple",
                "KillMode": "mixed",
                "NotifyAccess": "none",
                "User": "root",
                "ExecStart": _exec(
                    f"{LAUNCHER} --env CUDA_DEVICE_SM_LIMIT=50 -- /usr/bin/sleep inf"
                ),
                "Environment": f"VGPU_LAUNCH_PRELOAD={libs['lib']} PATH=/usr/bin:/bin",
                "EnvironmentFiles": f"{envfile} (ignore_errors=no)",
                "SystemCallFilter": "",
                "NoNewPrivileges": "yes",
                "CapabilityBoundingSet": "cap_chown cap_sys_ptrace cap_setuid",
                "ProtectKernelTunables": "yes",
                "PrivateDevices": "no",
            }
        },
    )
    r = doctor("--unit", "ollama", env=env)
    assert r.rc == 0, r.describe()
    assert "VGPU_LAUNCH_PRELOAD (Environment= of ollama)" in r.one("config: preload")["why"]
    assert "ExecStart of ollama" in r.one("config: env")["why"]
    assert r.status_of("unit ollama: ExecStart") == "ok"
    assert r.status_of("unit ollama: KillMode") == "ok"
    assert "vgpu-launch.conf" in r.one("unit ollama: drop-ins")["why"]
    assert r.status_of("unit ollama: SystemCallFilter") == "ok"
    assert r.status_of("unit ollama: NoNewPrivileges") == "ok"
    assert r.status_of("unit ollama: ProtectKernelTunables") == "ok"
    assert r.status_of(f"library {libs['lib']}: readable by root") == "ok"


def test_unit_broken(libs: dict[str, str], tmp_path: Path) -> None:
    """A unit with every setting that breaks vgpu-launch: each is named, with its fix."""
    # PrivateTmp= hides /tmp from the service: the library is put there, wherever the checkout
    # and the build are.
    in_tmp = Path(tempfile.mkdtemp(prefix="vgpu-doctor-", dir="/tmp"))
    lib = str(in_tmp / "libshim.so")
    shutil.copy(libs["lib"], lib)
    env = _unit_env(
        tmp_path,
        {
            "ollama.service": {
                "Id": "ollama.service",
                "LoadState": "loaded",
                "ActiveState": "active",
                "Type": "notify",
                "KillMode": "control-group",
                "NotifyAccess": "main",
                "ExecStart": _exec("/usr/local/bin/ollama serve"),
                "User": "root",
                "SystemCallFilter": SYSTEM_SERVICE,
                "SystemCallErrorNumber": "EPERM",
                "CapabilityBoundingSet": "cap_chown cap_setuid",
                "PrivateDevices": "yes",
                "PrivateTmp": "yes",
            }
        },
    )
    try:
        r = doctor("--unit", "ollama", "--preload", lib, env=env)
    finally:
        shutil.rmtree(in_tmp)
    assert r.rc == 1, r.describe()
    ex = r.one("unit ollama: ExecStart")
    assert ex["status"] == "fail" and "not vgpu-launch" in ex["why"]
    assert "ExecStart=/usr/bin/vgpu-launch -- /usr/local/bin/ollama serve" in ex["fix"]
    assert r.status_of("unit ollama: KillMode") == "warn"
    assert "KillMode=mixed" in r.one("unit ollama: KillMode")["fix"]
    na = r.one("unit ollama: NotifyAccess")
    assert na["status"] == "fail" and "NotifyAccess=all" in na["fix"]
    scf = r.one("unit ollama: SystemCallFilter")
    assert scf["status"] == "fail" and "ptrace" in scf["why"] and "EPERM" in scf["why"]
    assert r.status_of("unit ollama: CapabilityBoundingSet") == "warn"
    assert r.status_of("unit ollama: PrivateDevices") == "warn"
    pt = r.one("unit ollama: PrivateTmp")
    assert pt["status"] == "fail" and lib in pt["why"]
    assert "--preload" in r.one("config: preload")["why"]


def test_unit_deny_list(libs: dict[str, str], tmp_path: Path) -> None:
    """SystemCallFilter: ptrace denied fails; allowed, or not named by a deny-list, is ok."""
    base = {
        "LoadState": "loaded",
        "ExecStart": _exec(f"{LAUNCHER} -- /bin/true"),
        "KillMode": "mixed",
        "User": "root",
    }
    env = _unit_env(
        tmp_path,
        {
            "deny.service": {**base, "SystemCallFilter": "~ptrace process_vm_writev"},
            "allow.service": {**base, "SystemCallFilter": SYSTEM_SERVICE + " ptrace"},
            "other.service": {**base, "SystemCallFilter": "~mount umount2"},
        },
    )
    assert (
        doctor("--unit", "deny", "--preload", libs["lib"], env=env).status_of(
            "unit deny: SystemCallFilter"
        )
        == "fail"
    )
    assert (
        doctor("--unit", "allow", "--preload", libs["lib"], env=env).status_of(
            "unit allow: SystemCallFilter"
        )
        == "ok"
    )
    assert (
        doctor("--unit", "other", "--preload", libs["lib"], env=env).status_of(
            "unit other: SystemCallFilter"
        )
        == "ok"
    )


def test_unit_user_cannot_read(libs: dict[str, str], tmp_path: Path) -> None:
    """The library sits in a directory only root may enter; the unit runs as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to check for, and run a child as, another user)")
    top = Path(tempfile.mkdtemp(prefix="vgpu-doctor-"))  # pytest's own dirs are root-only
    try:
        top.chmod(0o755)
        d = top / "private"
        d.mkdir()
        d.chmod(0o700)
        lib = d / "libshim.so"
        shutil.copy(libs["lib"], lib)
        lib.chmod(0o644)
        env = _unit_env(
            tmp_path,
            {
                "svc.service": {
                    "LoadState": "loaded",
                    "ExecStart": _exec(f"{LAUNCHER} -- /bin/true"),
                    "KillMode": "mixed",
                    "User": "nobody",
                }
            },
        )
        r = doctor("--unit", "svc", "--preload", str(lib), env=env)
    finally:
        shutil.rmtree(top)
    assert r.rc == 1, r.describe()
    c = r.one(f"library {lib}: readable by nobody")
    assert c["status"] == "fail" and f"{d} (mode 0700" in c["why"]
    loads = r.one(f"library {lib}: loads (64-bit)")
    assert loads["status"] == "fail" and "as nobody" in loads["why"], r.describe()


def test_unit_not_found(libs: dict[str, str], tmp_path: Path) -> None:
    """A unit that does not exist fails, saying not-found."""
    env = _unit_env(tmp_path, {})
    r = doctor("--unit", "nosuch", "--preload", libs["lib"], env=env)
    assert r.rc == 1
    c = r.one("unit nosuch")
    assert c["status"] == "fail" and "not-found" in c["why"]


def test_unit_systemctl_fails(libs: dict[str, str], tmp_path: Path) -> None:
    """systemctl failing (no systemd): its own message is reported."""
    msg = "System has not been booted with systemd as init system (PID 1). Can't operate."
    env = _unit_env(tmp_path, {}, fail=msg)
    r = doctor("--unit", "ollama", "--preload", libs["lib"], env=env)
    assert r.rc == 1
    assert msg in r.one("unit ollama")["why"]


def test_unit_without_systemctl(libs: dict[str, str], tmp_path: Path) -> None:
    """No systemctl at all: the unit check fails, saying so."""
    (tmp_path / "bin").mkdir()
    env = _env({"PATH": str(tmp_path / "bin")})
    # bin/vgpu-launch needs sh from PATH: run the module directly (PYTHONPATH names the checkout)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vgpu_launch",
            "doctor",
            "--unit",
            "ollama",
            "--preload",
            libs["lib"],
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    checks = json.loads(proc.stdout)["checks"]
    unit = [c for c in checks if c["what"] == "unit ollama"]
    assert unit and unit[0]["status"] == "fail" and "systemctl not found" in unit[0]["why"]


# ---------------------------------------------------------------------------------------------
# the programs that will run: --check PROGRAM and the unit's CMD


@pytest.fixture(scope="module")
def progs(programs: Programs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Programs that do nothing (tests/programs/nothing.c), 64-bit, 32-bit and static, and a
    script whose interpreter is the 32-bit one."""
    script = tmp_path_factory.mktemp("progs") / "script32"
    script.write_text(f"#!{programs.nothing32}\n")
    script.chmod(0o755)
    return {
        "prog64": programs.nothing64,
        "prog32": programs.nothing32,
        "static64": programs.nothing_static,
        "script32": str(script),
    }


def test_32bit_program_turns_the_note_into_a_warning(
    libs: dict[str, str], progs: dict[str, str]
) -> None:
    """--check names a 32-bit program: the missing 32-bit build is now a warning naming it."""
    if not HAS32:
        pytest.skip("no 32-bit loader on this host")
    r = doctor("--preload", libs["lib"], "--check", progs["prog32"], "--check", progs["prog64"])
    assert r.rc == 0, r.describe()
    p = r.one(f"program {progs['prog32']}")
    assert p["status"] == "ok" and "32-bit, dynamically linked" in p["why"], r.describe()
    assert "64-bit, dynamically linked" in r.one(f"program {progs['prog64']}")["why"]
    w = r.one(f"library {libs['lib']}: 32-bit")
    assert w["status"] == "warn", r.describe()
    assert f"found 32-bit: {progs['prog32']} (--check)" in w["why"]
    assert progs["prog64"] not in w["why"]


def test_64bit_programs_leave_it_a_note(libs: dict[str, str], progs: dict[str, str]) -> None:
    """Only 64-bit and static programs checked: no 32-bit program, so only a note."""
    if not HAS32:
        pytest.skip("no 32-bit loader on this host")
    r = doctor("--preload", libs["lib"], "--check", progs["prog64"], "--check", progs["static64"])
    assert r.status_of(f"library {libs['lib']}: 32-bit") == "note", r.describe()
    s = r.one(f"program {progs['static64']}")
    assert s["status"] == "note" and "statically linked" in s["why"], r.describe()


def test_a_script_is_judged_by_its_interpreter(libs: dict[str, str], progs: dict[str, str]) -> None:
    """A #! script whose interpreter is 32-bit counts as a 32-bit program."""
    if not HAS32:
        pytest.skip("no 32-bit loader on this host")
    r = doctor("--preload", libs["lib"], "--check", progs["script32"])
    p = r.one(f"program {progs['script32']}")
    assert f"a script run by {progs['prog32']}, 32-bit" in p["why"], r.describe()
    assert r.status_of(f"library {libs['lib']}: 32-bit") == "warn"


def test_check_a_missing_program(libs: dict[str, str]) -> None:
    """A program that does not exist is a failure, with where it was looked for."""
    r = doctor("--preload", libs["lib"], "--check", "no-such-program-here")
    assert r.rc == 1
    c = r.one("program no-such-program-here")
    assert c["status"] == "fail" and "not found on PATH" in c["why"], r.describe()


def test_unit_execstart_32bit_program_warns(
    libs: dict[str, str], progs: dict[str, str], tmp_path: Path
) -> None:
    """The CMD of the unit's ExecStart is 32-bit: the missing 32-bit build is a warning."""
    if not HAS32:
        pytest.skip("no 32-bit loader on this host")
    env = _unit_env(
        tmp_path,
        {
            "old.service": {
                "LoadState": "loaded",
                "KillMode": "mixed",
                "User": "root",
                "ExecStart": _exec(
                    f"{LAUNCHER} --preload {libs['lib']} -- {progs['prog32']} serve"
                ),
            }
        },
    )
    r = doctor("--unit", "old", env=env)
    assert r.status_of(f"program {progs['prog32']}") == "ok", r.describe()
    w = r.one(f"library {libs['lib']}: 32-bit")
    assert w["status"] == "warn" and "ExecStart of old" in w["why"], r.describe()


# ---------------------------------------------------------------------------------------------
# setuid programs under a tracer without CAP_SYS_PTRACE


def test_setuid_note_without_cap_sys_ptrace(libs: dict[str, str]) -> None:
    """Run where vgpu-launch would lack CAP_SYS_PTRACE, doctor notes that setuid and
    file-capability programs lose their privileges; with it, it says they keep them."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop CAP_SYS_PTRACE")
    with_cap = doctor("--preload", libs["lib"]).one("ptrace: setuid programs")
    assert with_cap["status"] == "ok" and "keep their privileges" in with_cap["why"]
    r = doctor(
        "--preload",
        libs["lib"],
        prefix=["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace"],
    )
    c = r.one("ptrace: setuid programs")
    assert c["status"] == "note", r.describe()
    assert "lacks CAP_SYS_PTRACE" in c["why"] and "run without their privileges" in c["why"]
    assert r.rc == 0  # a note, not a failure


def test_setuid_note_for_a_unit_run_as_another_user(libs: dict[str, str], tmp_path: Path) -> None:
    """A unit with User=nobody runs vgpu-launch without CAP_SYS_PTRACE: a note; root: ok."""
    base = {
        "LoadState": "loaded",
        "ExecStart": _exec(f"{LAUNCHER} -- /bin/true"),
        "KillMode": "mixed",
    }
    env = _unit_env(
        tmp_path,
        {"nobody.service": {**base, "User": "nobody"}, "root.service": {**base, "User": "root"}},
    )
    c = doctor("--unit", "nobody", "--preload", libs["lib"], env=env).one("ptrace: setuid programs")
    assert c["status"] == "note" and "run as nobody by unit nobody" in c["why"], c
    c = doctor("--unit", "root", "--preload", libs["lib"], env=env).one("ptrace: setuid programs")
    assert c["status"] == "ok" and "run as root by unit root" in c["why"], c


# ---------------------------------------------------------------------------------------------
# secrets: --env, --force-env and [env] values are not shown unless asked

SECRETS = ("s3cret-from-variable", "hunter2-from-file", "topsecret-from-execstart")


def test_env_values_are_hidden(libs: dict[str, str], tmp_path: Path) -> None:
    """doctor shows the names of --env/--force-env/[env] variables, not their values, in text
    and JSON, in the configuration lines and in the unit's ExecStart."""
    conf = tmp_path / "vgpu-launch.conf"
    conf.write_text(f'[force_env]\nDB_PASSWORD = "{SECRETS[1]}"\n')
    env = _unit_env(
        tmp_path,
        {
            "svc.service": {
                "LoadState": "loaded",
                "KillMode": "mixed",
                "User": "root",
                "ExecStart": _exec(
                    f"{LAUNCHER} --env API_KEY={SECRETS[2]} --env=OTHER=x -- /bin/true"
                ),
                "Environment": f"VGPU_LAUNCH_ENV=TOKEN={SECRETS[0]} VGPU_LAUNCH_CONFIG={conf}",
            }
        },
    )
    args = ["doctor", "--unit", "svc", "--preload", libs["lib"]]
    for fmt in ("text", "json"):
        proc = subprocess.run(
            [str(LAUNCHER), *args, "--format", fmt],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for secret in SECRETS:
            assert secret not in proc.stdout + proc.stderr, (fmt, proc.stdout)
        for name in ("API_KEY", "TOKEN", "DB_PASSWORD", "OTHER"):
            assert name in proc.stdout, (fmt, name, proc.stdout)
    r = doctor(*args[1:], env=env)
    assert (
        "--env API_KEY=(hidden) --env=OTHER=(hidden) -- /bin/true"
        in r.one("unit svc: ExecStart")["why"]
    ), r.describe()
    assert "--show-values" in r.one("config: env")["why"]


def test_show_values_shows_them(libs: dict[str, str], tmp_path: Path) -> None:
    """--show-values: the values are shown, as asked."""
    env = _unit_env(
        tmp_path,
        {
            "svc.service": {
                "LoadState": "loaded",
                "KillMode": "mixed",
                "User": "root",
                "ExecStart": _exec(f"{LAUNCHER} --env API_KEY={SECRETS[2]} -- /bin/true"),
                "Environment": f"VGPU_LAUNCH_ENV=TOKEN={SECRETS[0]}",
            }
        },
    )
    r = doctor("--unit", "svc", "--preload", libs["lib"], "--show-values", env=env)
    assert f"TOKEN={SECRETS[0]}" in r.one("config: env")["why"], r.describe()
    assert f"API_KEY={SECRETS[2]}" in r.one("config: env")["why"]
    assert f"--env API_KEY={SECRETS[2]}" in r.one("unit svc: ExecStart")["why"]
