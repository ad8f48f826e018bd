"""Building what the tests run: every C program of tests/programs, and examples/ollama-like.

``build_programs()`` compiles the table ``PROGRAMS`` once per content hash (sources, table,
flags, compilers) into ``CACHE/programs-<hash>``, a directory that every user may read and
enter: some tests run processes as ``nobody``, and a checkout may sit where only root can go.
It returns a ``Programs``: the absolute path of each artefact, by name, as a ``str``
(``programs.rprobe``, ``programs["probe-static"]``).  A program whose compiler is missing is
not an error of the whole build: the tests that use it fail, naming the Debian package to
install, and ``"rprobe32" in programs`` is false (tests that can do without skip).

Preload libraries for ``$LIB`` tokens are laid out where glibc's ld.so looks for them
(``programs.libmarker_lib_token``, ``programs.shim_lib_token``, ``programs.shim64_lib_token``);
``programs.lib_expansion`` says what ld.so expands ``$LIB`` to here (``{"64": ..., "32": ...}``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from support import REPO

PROGRAMS_SRC = REPO / "tests" / "programs"
OLLAMA_SRC = REPO / "examples" / "ollama-like"
# World-readable, outside the checkout: tests run some of these programs as nobody.
CACHE = Path(
    os.environ.get(
        "VGPU_TEST_CACHE", Path(tempfile.gettempdir()) / f"vgpu-launch-tests-{os.getuid()}"
    )
)

CFLAGS = ["-O2", "-g", "-Wall", "-Wextra"]
SO = ["-shared", "-fPIC"]

# Compilers: argv prefix, Debian package that provides it (or what it needs to work).
COMPILERS: dict[str, tuple[list[str], str]] = {
    "cc": (["gcc"], "gcc"),
    "cc-static": (["gcc", "-static"], "libc6-dev (static libc.a)"),
    "cc32": (["gcc", "-m32"], "gcc-multilib"),
    "musl": (["musl-gcc"], "musl-tools"),
}

# name -> (output path inside the build directory, compiler, source, extra flags).  Flags may
# name "{build}", the build directory.  Outputs under "_link/" only serve to link others and are
# removed once everything is built.
PROGRAMS: dict[str, tuple[str, str, str, list[str]]] = {
    # the process shapes (tests/launcher/test_shapes.py)
    "probe": ("probe", "cc", "probe.c", []),
    "probe_static": ("probe-static", "cc-static", "probe.c", []),
    "probe32": ("probe32", "cc32", "probe.c", []),
    "probe_musl": ("probe-musl", "musl", "probe.c", []),
    "spawn": ("spawn", "cc", "spawn.c", ["-pthread"]),
    "spawn_static": ("spawn-static", "cc-static", "spawn.c", ["-pthread"]),
    "chain": ("chain", "cc", "chain.c", []),
    "manyenv": ("manyenv", "cc", "manyenv.c", []),
    "sigspam": ("sigspam", "cc", "sigspam.c", ["-pthread"]),
    # the machine's ABI as the C library's headers describe it (tests/unit/test_arch.py)
    "archinfo": ("archinfo", "cc", "archinfo.c", []),
    "archinfo32": ("archinfo32", "cc32", "archinfo.c", []),
    # preload libraries: 64-bit at the top, and one per $LIB directory glibc may use
    "libmarker": ("libmarker.so", "cc", "libmarker.c", SO),
    "libother": ("libother.so", "cc", "libmarker.c", [*SO, '-DMARKER_TAG="other"']),
    "libmarker64": ("lib64/libmarker.so", "cc", "libmarker.c", SO),
    "libmarker32": ("lib32/libmarker.so", "cc32", "libmarker.c", SO),
    # Debian/Ubuntu multiarch ($LIB of libc6:amd64 and of libc6:i386)
    "libmarker_multiarch64": ("lib/x86_64-linux-gnu/libmarker.so", "cc", "libmarker.c", SO),
    "libmarker_multiarch32": ("lib/i386-linux-gnu/libmarker.so", "cc32", "libmarker.c", SO),
    # Fedora/RHEL: $LIB is lib64 for 64-bit and lib for 32-bit programs
    "libmarker_lib32": ("lib/libmarker.so", "cc32", "libmarker.c", SO),
    # the launcher's transparency (tests/launcher)
    "sigrec": ("sigrec", "cc", "sigrec.c", ["-pthread"]),
    "showsig": ("showsig", "cc", "showsig.c", []),
    "die": ("die", "cc", "die.c", []),
    "orphans": ("orphans", "cc", "orphans.c", []),
    "splitkill": ("splitkill", "cc", "splitkill.c", []),
    "libtest": ("libtest.so", "cc", "libtest.c", SO),
    # a seccomp filter on ptrace alone, killing or refusing (tests/launcher/test_ptrace_refused.py)
    "seccomp_ptrace": ("seccomp_ptrace", "cc", "seccomp_ptrace.c", []),
    # faults, strict mode, security, soak (tests/robustness)
    "rprobe": ("rprobe", "cc", "rprobe.c", []),
    "rprobe32": ("rprobe32", "cc32", "rprobe.c", []),
    "rtool": ("rtool", "cc", "rtool.c", ["-pthread"]),
    "soak": ("soak", "cc", "soak.c", ["-pthread"]),
    "execkill": ("execkill", "cc", "execkill.c", []),
    "reexec": ("reexec", "cc", "reexec.c", []),
    "stuckld": ("stuckld", "cc", "stuckld.c", ["-nostdlib", "-static-pie", "-fPIE"]),
    "librobustmark": ("librobustmark.so", "cc", "librobustmark.c", SO),
    "librobustmark32": ("librobustmark32.so", "cc32", "librobustmark.c", SO),
    # preloads that print nothing (tests/robustness/test_log.py, tests/unit/test_docs_jq.py)
    "libquiet": ("libquiet.so", "cc", "quiet.c", SO),
    "libsilent_marker": ("silent/libmarker.so", "cc", "quiet.c", SO),
    # doctor, status, the load verifier (tests/diagnostics)
    "sleeper": ("sleeper", "cc", "sleeper.c", []),
    "sleeper32": ("sleeper32", "cc32", "sleeper.c", []),
    "sleeper_static": ("sleeper-static", "cc-static", "sleeper.c", []),
    "sleeper_musl": ("sleeper-musl", "musl", "sleeper.c", []),
    "nothing64": ("nothing64", "cc", "nothing.c", []),
    "nothing32": ("nothing32", "cc32", "nothing.c", []),
    "nothing_static": ("nothing-static", "cc-static", "nothing.c", []),
    "libshim": ("libshim.so", "cc", "shim.c", SO),
    "libshim32": ("libshim32.so", "cc32", "shim.c", SO),
    "libaborts": ("libaborts.so", "cc", "aborts.c", SO),
    "_libdep": ("_link/libdep.so", "cc", "dep.c", SO),
    "libneeds": ("libneeds.so", "cc", "needs.c", [*SO, "-L{build}/_link", "-ldep"]),
    # giving processes back: to debuggers, on the tree's own ptrace requests (tests/release)
    "librelmarker": ("librelmarker.so", "cc", "librelmarker.c", SO),
    "rel_probe": ("rel_probe", "cc", "rel_probe.c", []),
    # -O0: gdb's backtrace must show the loops by name, not inlined
    "rel_worker": ("rel_worker", "cc", "rel_worker.c", ["-pthread", "-O0"]),
    "rel_ptrace": ("rel_ptrace", "cc", "rel_ptrace.c", []),
    "rel_ptrace32": ("rel_ptrace32", "cc32", "rel_ptrace.c", []),
    "rel_nosec": ("rel_nosec", "cc", "rel_nosec.c", []),
    # LeakSanitizer; -O0 so that the leaked block is not optimised away
    "rel_leak": ("rel_leak", "cc", "rel_leak.c", ["-fsanitize=address", "-O0"]),
}

LIB_TOKEN_PRELOAD = "$LIB/libmarker.so"
# libshim.so laid out for $LIB: both word sizes (doctor), and the 64-bit build alone (verify).
SHIM_LAYOUTS = {
    "shim_lib_token": ("tok", ("64", "32")),
    "shim64_lib_token": ("only64/tok", ("64",)),
}


class Programs(dict[str, str]):
    """Paths of built artefacts by name; ``p["probe-static"]`` is ``p.probe_static``.  A name
    whose build failed makes the test that asks for it fail, saying what to install."""

    def __init__(
        self,
        paths: dict[str, str],
        failed: dict[str, str] | None = None,
        lib_expansion: dict[str, str | None] | None = None,
    ) -> None:
        super().__init__(paths)
        self.failed = failed or {}
        self.lib_expansion = lib_expansion or {}

    def __getattr__(self, name: str) -> str:
        return self[name]

    def __getitem__(self, key: str) -> str:
        key = key.replace("-", "_")
        if key in self.failed:
            pytest.fail(self.failed[key], pytrace=False)
        try:
            return super().__getitem__(key)
        except KeyError:
            raise AttributeError(key) from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.replace("-", "_"))


def _missing(what: str, package: str) -> str:
    return (
        f"{what} is needed to build the test programs: install it "
        f"(Debian/Ubuntu: apt-get install {package})"
    )


def _compiler_identity() -> str:
    parts = []
    for exe in ("gcc", "musl-gcc"):
        path = shutil.which(exe)
        out = (
            ""
            if path is None
            else subprocess.run(
                [exe, "-dumpfullversion", "-dumpversion"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
        parts.append(f"{path}:{out}")
    return "|".join(parts)


def _hash_files(paths: Sequence[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds of one cache entry between test sessions running at once."""
    _public_mkdir(path.parent)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _public_mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_uid == os.geteuid():
        path.chmod(0o755)


def _compile(build: Path, out: str, compiler: str, source: str, flags: list[str]) -> str | None:
    """Build one artefact; the reason it could not be built, or None."""
    prefix, package = COMPILERS[compiler]
    if shutil.which(prefix[0]) is None:
        return _missing(prefix[0], package)
    target = build / out
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = [f.replace("{build}", str(build)) for f in flags]
    cmd = [*prefix, *CFLAGS, "-o", str(target), str(PROGRAMS_SRC / source), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    if proc.returncode != 0:
        return (
            f"building {out} failed (if a library or header is missing, install the "
            f"Debian package {package}):\n$ {' '.join(cmd)}\n{proc.stderr}"
        )
    return None


def _lib_expansion(build: Path, probe: Path) -> str | None:
    """What ld.so expands $LIB to for this program (from LD_TRACE_LOADED_OBJECTS output)."""
    env = {"LD_TRACE_LOADED_OBJECTS": "1", "LD_PRELOAD": f"{build}/{LIB_TOKEN_PRELOAD}"}
    out = subprocess.run([str(probe)], env=env, capture_output=True, text=True, check=False).stdout
    m = re.search(r"\$LIB/libmarker\.so => (\S+)/libmarker\.so", out)
    if m is None:
        return None
    return os.path.relpath(m.group(1), build)


def _check_lib_layout(build: Path, failed: dict[str, str]) -> dict[str, str | None]:
    """ld.so's $LIB for each word size whose probe was built; a layout that ld.so does not find
    makes the token's users fail."""
    expansion: dict[str, str | None] = {}
    for bits, name in (("64", "probe"), ("32", "probe32")):
        if name in failed:
            expansion[bits] = None
            continue
        probe = build / PROGRAMS[name][0]
        expansion[bits] = _lib_expansion(build, probe)
        env = {"LD_PRELOAD": f"{build}/{LIB_TOKEN_PRELOAD}"}
        out = subprocess.run(
            [str(probe)], env=env, capture_output=True, text=True, check=False
        ).stdout
        if "marker=1" not in out:
            failed["libmarker_lib_token"] = (
                f"a {bits}-bit program does not load {LIB_TOKEN_PRELOAD} from {build}: ld.so "
                f"expands $LIB to {expansion[bits]!r} here, which the layout in "
                f"tests/support/build.py (PROGRAMS) does not cover; probe said {out!r}"
            )
    return expansion


def _shim_layouts(build: Path, expansion: dict[str, str | None], failed: dict[str, str]) -> None:
    for name, (top, sizes) in SHIM_LAYOUTS.items():
        for bits in sizes:
            lib = "libshim" if bits == "64" else "libshim32"
            where = expansion.get(bits)
            if lib in failed or where is None:
                continue
            (build / top / where).mkdir(parents=True, exist_ok=True)
            shutil.copy(build / PROGRAMS[lib][0], build / top / where / "libshim.so")
        if "64" not in expansion or expansion["64"] is None:
            failed[name] = f"no 64-bit $LIB layout for {name}: {failed.get('probe', '')}"


def _make_public(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)


@functools.cache
def build_programs() -> Programs:
    sources = sorted([*PROGRAMS_SRC.glob("*.c"), *PROGRAMS_SRC.glob("*.h")])
    key = _hash_files(
        sources, repr(PROGRAMS) + repr(SHIM_LAYOUTS) + repr(CFLAGS) + _compiler_identity()
    )
    final = CACHE / f"programs-{key}"
    with _locked(CACHE / f"programs-{key}.lock"):
        layout = final / "layout.json"
        if not layout.exists():
            tmp = CACHE / f"programs-{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            failed: dict[str, str] = {}
            for name, (out, compiler, source, flags) in PROGRAMS.items():
                why = _compile(tmp, out, compiler, source, flags)
                if why is not None:
                    failed[name] = why
            shutil.rmtree(tmp / "_link", ignore_errors=True)
            # the $LIB check runs against the final path, which is what the tests use
            if failed:  # not cached: installing the missing package must lead to a rebuild
                final = CACHE / f"programs-{key}.incomplete-{os.getpid()}"
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            expansion = _check_lib_layout(final, failed)
            _shim_layouts(final, expansion, failed)
            _make_public(final)
            (final / "layout.json").write_text(
                json.dumps({"lib_expansion": expansion, "failed": failed})
            )
            layout = final / "layout.json"
    data = json.loads(layout.read_text())
    paths = {
        name: str(final / out)
        for name, (out, *_rest) in PROGRAMS.items()
        if not name.startswith("_") and name not in data["failed"]
    }
    paths["dir"] = str(final)
    paths["libmarker_lib_token"] = f"{final}/{LIB_TOKEN_PRELOAD}"
    for name, (top, _sizes) in SHIM_LAYOUTS.items():
        paths[name] = f"{final}/{top}/$LIB/libshim.so"
    failed = {k: v for k, v in data["failed"].items() if not k.startswith("_")}
    for name in failed:
        paths.pop(name, None)
    return Programs(paths, failed, data["lib_expansion"])


def build_ollama_like() -> Programs:
    """examples/ollama-like, built with its build.sh: ``ollama``, ``libcuda``, ``shim``."""
    if shutil.which("go") is None:
        pytest.fail(_missing("go (with cgo)", "golang-go"), pytrace=False)
    if shutil.which("gcc") is None:
        pytest.fail(_missing("gcc", "gcc"), pytrace=False)
    sources = [p for p in OLLAMA_SRC.iterdir() if p.is_file()]
    key = _hash_files(sources)
    out = CACHE / f"ollama-like-{key}"
    with _locked(CACHE / f"ollama-like-{key}.lock"):
        proc = subprocess.run(
            [str(OLLAMA_SRC / "build.sh"), str(out)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"examples/ollama-like/build.sh failed (it needs gcc and golang-go):\n"
                f"{proc.stdout}{proc.stderr}",
                pytrace=False,
            )
    return Programs(
        {
            "dir": str(out),
            "ollama": str(out / "ollama"),
            "libcuda": str(out / "libcuda.so.1"),
            "shim": str(out / "libvgpu-test-shim.so"),
        }
    )


def public_dir(prefix: str) -> Path:
    """A fresh directory that ``nobody`` can read and enter (pytest's tmp_path cannot be)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d
