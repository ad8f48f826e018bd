"""Test plumbing: build the test programs and the ollama-like example once, run vgpu-launch.

Fixtures (all session-scoped):

``programs``
    The C programs of ``tests/programs`` compiled into ``.cache/tests/programs-<hash>`` (the hash
    covers the sources, the build recipes and the compilers, so a rerun with nothing changed does
    not compile anything).  Attribute or key access: ``programs.probe``,
    ``programs["probe-static"]``.  See ``PROGRAMS`` below for every name.  The preload libraries
    are laid out so that ``programs.libmarker_lib_token`` (``<dir>/$LIB/libmarker.so``) finds a
    64-bit build for 64-bit programs and a 32-bit one for 32-bit programs;
    ``programs.lib_expansion`` says what glibc's ld.so expands ``$LIB`` to here
    (``{"64": ..., "32": ...}``).

``ollama_like``
    ``examples/ollama-like`` built with its ``build.sh`` into ``.cache/tests/ollama-like-<hash>``:
    ``ollama_like.ollama``, ``ollama_like.libcuda``, ``ollama_like.shim``, ``ollama_like.dir``.

``vgpu_launch``
    The argv prefix that runs the launcher from the checkout: ``[<repo>/bin/vgpu-launch]`` when it
    is executable, else ``[sys.executable, <repo>/bin/vgpu-launch]``.

``run_launch``
    ``run_launch(args, *, env=None, timeout=120, cwd=None, input=None, log_format="json")``
    runs ``vgpu-launch [--log-format json] *args`` and returns a ``LaunchResult``, which unpacks
    as ``(returncode, stdout, stderr, events)``; ``events`` are the JSON lines of stderr, parsed;
    ``result.lines`` are the other stderr lines (the programs' own output).  ``env`` updates a
    clean copy of this environment (``LD_PRELOAD`` and ``VGPU_TEST_*`` removed); a value of
    ``None`` removes a variable.

A missing compiler fails the tests that need it, naming the Debian package to install.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import robustlib

REPO = Path(__file__).resolve().parent.parent
PROGRAMS_SRC = REPO / "tests" / "programs"
OLLAMA_SRC = REPO / "examples" / "ollama-like"
LAUNCHER = REPO / "bin" / "vgpu-launch"
CACHE = Path(os.environ.get("VGPU_TEST_CACHE", REPO / ".cache" / "tests"))

CFLAGS = ["-O2", "-g", "-Wall", "-Wextra"]

# Compilers: argv prefix, Debian package that provides it (or what it needs to work).
COMPILERS: dict[str, tuple[list[str], str]] = {
    "cc": (["gcc"], "gcc"),
    "cc-static": (["gcc", "-static"], "libc6-dev (static libc.a)"),
    "cc32": (["gcc", "-m32"], "gcc-multilib"),
    "musl": (["musl-gcc"], "musl-tools"),
}

# name -> (output path inside the build dir, compiler, source, extra flags)
PROGRAMS: dict[str, tuple[str, str, str, list[str]]] = {
    "probe": ("probe", "cc", "probe.c", []),
    "probe_static": ("probe-static", "cc-static", "probe.c", []),
    "probe32": ("probe32", "cc32", "probe.c", []),
    "probe_musl": ("probe-musl", "musl", "probe.c", []),
    "spawn": ("spawn", "cc", "spawn.c", ["-pthread"]),
    "spawn_static": ("spawn-static", "cc-static", "spawn.c", ["-pthread"]),
    "chain": ("chain", "cc", "chain.c", []),
    "manyenv": ("manyenv", "cc", "manyenv.c", []),
    "sigspam": ("sigspam", "cc", "sigspam.c", ["-pthread"]),
    # preload libraries: 64-bit at the top, and one per $LIB directory glibc may use
    "libmarker": ("libmarker.so", "cc", "libmarker.c", ["-shared", "-fPIC"]),
    "libother": ("libother.so", "cc", "libmarker.c", ["-shared", "-fPIC", '-DMARKER_TAG="other"']),
    "libmarker64": ("lib64/libmarker.so", "cc", "libmarker.c", ["-shared", "-fPIC"]),
    "libmarker32": ("lib32/libmarker.so", "cc32", "libmarker.c", ["-shared", "-fPIC"]),
    # Debian/Ubuntu multiarch ($LIB of libc6:amd64 and of libc6:i386)
    "libmarker_multiarch64": (
        "lib/x86_64-linux-gnu/libmarker.so",
        "cc",
        "libmarker.c",
        ["-shared", "-fPIC"],
    ),
    "libmarker_multiarch32": (
        "lib/i386-linux-gnu/libmarker.so",
        "cc32",
        "libmarker.c",
        ["-shared", "-fPIC"],
    ),
    # Fedora/RHEL: $LIB is lib64 for 64-bit and lib for 32-bit programs
    "libmarker_lib32": ("lib/libmarker.so", "cc32", "libmarker.c", ["-shared", "-fPIC"]),
}

LIB_TOKEN_PRELOAD = "$LIB/libmarker.so"


class Artefacts(dict[str, Any]):
    """A dict whose keys are also attributes; ``a["probe-static"]`` is ``a.probe_static``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(key.replace("-", "_"))


# ---------------------------------------------------------------------------------------------
# building


def _fail_missing(what: str, package: str) -> None:
    pytest.fail(
        f"{what} is needed to build the test programs: install it "
        f"(Debian/Ubuntu: apt-get install {package})",
        pytrace=False,
    )


def _compiler_identity() -> str:
    parts = []
    for exe in ("gcc", "musl-gcc"):
        path = shutil.which(exe)
        if path is None:
            _fail_missing(exe, COMPILERS["musl" if exe == "musl-gcc" else "cc"][1])
        out = subprocess.run(
            [exe, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True, check=False
        ).stdout.strip()
        parts.append(f"{path}:{out}")
    return "|".join(parts)


def _hash_files(paths: Sequence[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds of one cache entry between concurrent test sessions (e.g. xdist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(build: Path, out: str, compiler: str, source: str, flags: list[str]) -> None:
    prefix, package = COMPILERS[compiler]
    if shutil.which(prefix[0]) is None:
        _fail_missing(prefix[0], package)
    target = build / out
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*prefix, *CFLAGS, *flags, "-o", str(target), str(PROGRAMS_SRC / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"building {out} failed (if a library or header is missing, install the "
            f"Debian package {package}):\n$ {' '.join(cmd)}\n{proc.stderr}",
            pytrace=False,
        )


def _lib_expansion(build: Path, probe: Path) -> str | None:
    """What ld.so expands $LIB to for this program (from LD_TRACE_LOADED_OBJECTS output)."""
    env = {"LD_TRACE_LOADED_OBJECTS": "1", "LD_PRELOAD": f"{build}/{LIB_TOKEN_PRELOAD}"}
    out = subprocess.run([str(probe)], env=env, capture_output=True, text=True, check=False).stdout
    m = re.search(r"\$LIB/libmarker\.so => (\S+)/libmarker\.so", out)
    if m is None:
        return None
    return os.path.relpath(m.group(1), build)


def _check_lib_layout(build: Path) -> dict[str, str | None]:
    expansion: dict[str, str | None] = {}
    for bits, probe in (("64", build / "probe"), ("32", build / "probe32")):
        expansion[bits] = _lib_expansion(build, probe)
        env = {"LD_PRELOAD": f"{build}/{LIB_TOKEN_PRELOAD}"}
        out = subprocess.run(
            [str(probe)], env=env, capture_output=True, text=True, check=False
        ).stdout
        if "marker=1" not in out:
            pytest.fail(
                f"a {bits}-bit program does not load {LIB_TOKEN_PRELOAD} from {build}: "
                f"ld.so expands $LIB to {expansion[bits]!r} here, which the layout in "
                f"tests/conftest.py (PROGRAMS) does not cover; probe said {out!r}",
                pytrace=False,
            )
    return expansion


def build_programs() -> Artefacts:
    sources = sorted(PROGRAMS_SRC.glob("*.c"))
    key = _hash_files(sources, repr(PROGRAMS) + repr(CFLAGS) + _compiler_identity())
    final = CACHE / f"programs-{key}"
    with _locked(CACHE / f"programs-{key}.lock"):
        if not (final / "layout.json").exists():
            tmp = CACHE / f"programs-{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for out, compiler, source, flags in PROGRAMS.values():
                _compile(tmp, out, compiler, source, flags)
            # the $LIB check runs against the final path, which is what the tests use
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            expansion = _check_lib_layout(final)
            (final / "layout.json").write_text(json.dumps({"lib_expansion": expansion}))
    layout = json.loads((final / "layout.json").read_text())
    arts = Artefacts({name: final / out for name, (out, *_rest) in PROGRAMS.items()})
    arts["dir"] = final
    arts["libmarker_lib_token"] = f"{final}/{LIB_TOKEN_PRELOAD}"
    arts["lib_expansion"] = layout["lib_expansion"]
    return arts


def build_ollama_like() -> Artefacts:
    if shutil.which("go") is None:
        _fail_missing("go (with cgo)", "golang-go")
    if shutil.which("gcc") is None:
        _fail_missing("gcc", "gcc")
    sources = [p for p in OLLAMA_SRC.iterdir() if p.is_file()]
    key = _hash_files(sources)
    out = CACHE / f"ollama-like-{key}"
    with _locked(CACHE / f"ollama-like-{key}.lock"):
        proc = subprocess.run(
            [str(OLLAMA_SRC / "build.sh"), str(out)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            pytest.fail(
                f"examples/ollama-like/build.sh failed (it needs gcc and golang-go):\n"
                f"{proc.stdout}{proc.stderr}",
                pytrace=False,
            )
    return Artefacts(
        dir=out,
        ollama=out / "ollama",
        libcuda=out / "libcuda.so.1",
        shim=out / "libvgpu-test-shim.so",
    )


@pytest.fixture(scope="session")
def built() -> robustlib.Built:
    """The robustness tests' programs (tests/robust_programs), built where nobody can run them."""
    return robustlib.build()


@pytest.fixture
def pub(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh root-owned 0755 directory under /tmp (nobody can enter it; tmp_path cannot be)."""
    d = robustlib.public_dir(f"vgpu-{request.module.__name__.removeprefix('test_')}-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def programs() -> Artefacts:
    return build_programs()


@pytest.fixture(scope="session")
def ollama_like() -> Artefacts:
    return build_ollama_like()


# ---------------------------------------------------------------------------------------------
# running the launcher

PROBE_RE = re.compile(
    r"^probe pid=(?P<pid>\d+) LD_PRELOAD=(?P<preload>.*) VGPU_TEST_DEVICES=(?P<devices>\S*) "
    r"marker=(?P<marker>[01])$"
)


def parse_probes(stdout: str) -> list[dict[str, Any]]:
    """The ``probe`` lines of some output, as dicts (pid, preload, devices, marker)."""
    found = []
    for line in stdout.splitlines():
        m = PROBE_RE.match(line)
        if m:
            found.append(
                {
                    "pid": int(m["pid"]),
                    "preload": m["preload"],
                    "devices": m["devices"],
                    "marker": int(m["marker"]),
                }
            )
    return found


def split_stderr(stderr: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Separate the launcher's JSON log lines from everything else on stderr."""
    events: list[dict[str, Any]] = []
    lines: list[str] = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                events.append(obj)
                continue
        lines.append(line)
    return events, lines


def _same_file(a: Any, b: Path | str) -> bool:
    if not a:
        return False
    try:
        return os.path.realpath(str(a)) == os.path.realpath(str(b))
    except (OSError, ValueError):
        return False


class LaunchResult(tuple):  # type: ignore[type-arg]
    """``(returncode, stdout, stderr, events)`` plus helpers for assertions."""

    lines: list[str]
    argv: list[str]

    def __new__(
        cls,
        returncode: int,
        stdout: str,
        stderr: str,
        events: list[dict[str, Any]],
        lines: list[str],
        argv: list[str],
    ) -> LaunchResult:
        self = super().__new__(cls, (returncode, stdout, stderr, events))
        self.lines = lines
        self.argv = argv
        return self

    @property
    def returncode(self) -> int:
        return self[0]  # type: ignore[no-any-return]

    @property
    def stdout(self) -> str:
        return self[1]  # type: ignore[no-any-return]

    @property
    def stderr(self) -> str:
        return self[2]  # type: ignore[no-any-return]

    @property
    def events(self) -> list[dict[str, Any]]:
        return self[3]  # type: ignore[no-any-return]

    @property
    def probes(self) -> list[dict[str, Any]]:
        return parse_probes(self.stdout)

    def exec_events(
        self, exe: Path | str | None = None, pid: int | None = None, decision: str | None = None
    ) -> list[dict[str, Any]]:
        """exec events, optionally only those of program ``exe`` / process ``pid`` / decision.

        A program matches by the event's ``exe`` or, failing that, its ``argv[0]`` (both compared
        after resolving symlinks)."""
        found = []
        for ev in self.events:
            if ev.get("event") != "exec":
                continue
            if pid is not None and ev.get("pid") != pid:
                continue
            if decision is not None and ev.get("decision") != decision:
                continue
            if exe is not None:
                argv0 = (ev.get("argv") or [None])[0]
                if not (_same_file(ev.get("exe"), exe) or _same_file(argv0, exe)):
                    continue
            found.append(ev)
        return found

    def describe(self, tail: int = 60) -> str:
        """For assertion messages: the command, status, and the ends of its output."""
        out = "\n".join(self.stdout.splitlines()[-tail:])
        err = "\n".join(self.stderr.splitlines()[-tail:])
        return (
            f"\n$ {' '.join(self.argv)}\nexit status {self.returncode}\n"
            f"--- stdout (last {tail} lines)\n{out}\n--- stderr (last {tail} lines)\n{err}"
        )


def clean_env(updates: dict[str, str | None] | None = None) -> dict[str, str]:
    """This environment without LD_PRELOAD and VGPU_TEST_*, updated (None removes)."""
    env = {
        k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("VGPU_TEST_")
    }
    for k, v in (updates or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@pytest.fixture(scope="session")
def vgpu_launch() -> list[str]:
    if not LAUNCHER.exists():
        pytest.fail(f"{LAUNCHER} does not exist", pytrace=False)
    if os.access(LAUNCHER, os.X_OK):
        return [str(LAUNCHER)]
    return [sys.executable, str(LAUNCHER)]


RunLaunch = Callable[..., LaunchResult]


@pytest.fixture(scope="session")
def run_launch(vgpu_launch: list[str]) -> RunLaunch:
    def run(
        args: Sequence[str | os.PathLike[str]],
        *,
        env: dict[str, str | None] | None = None,
        timeout: float = 120,
        cwd: str | os.PathLike[str] | None = None,
        input: str | None = None,
        log_format: str | None = "json",
    ) -> LaunchResult:
        words = [os.fspath(a) for a in args]
        options = words[: words.index("--")] if "--" in words else words
        opts = []
        if log_format and not any(
            a == "--log-format" or a.startswith("--log-format=") for a in options
        ):
            opts = ["--log-format", log_format]
        argv = [*vgpu_launch, *opts, *words]
        try:
            proc = subprocess.run(
                argv,
                env=clean_env(env),
                cwd=cwd,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:

            def text(b: bytes | str | None) -> str:
                if isinstance(b, bytes):
                    return b.decode(errors="replace")
                return b or ""

            pytest.fail(
                f"$ {' '.join(argv)}\ndid not finish within {timeout} s\n"
                f"--- stdout\n{text(exc.stdout)[-4000:]}\n"
                f"--- stderr\n{text(exc.stderr)[-4000:]}",
                pytrace=False,
            )
        events, lines = split_stderr(proc.stderr)
        return LaunchResult(proc.returncode, proc.stdout, proc.stderr, events, lines, argv)

    return run
