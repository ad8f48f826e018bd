#!/usr/bin/env python3
"""Run every workload directly, under vgpu-launch and under strace; print a Markdown table.

Usage: python3 bench/run.py [--quick] [--reps N] [--only NAME,...] [--idle-seconds S]
See docs/performance.md for what each workload measures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CACHE = ROOT / ".cache" / "bench"
RESULTS = BENCH / "results"
VGPU_LAUNCH = ROOT / "bin" / "vgpu-launch"
FIXTURE_BUILD = ROOT / "examples" / "ollama-like" / "build.sh"
STRACE = ["strace", "-f", "--seccomp-bpf", "-e", "trace=execve", "-o", "/dev/null"]
MODES = ("direct", "vgpu-launch", "strace")
# Every mode runs with this environment. vgpu-launch is Python: let it keep its compiled bytecode
# (in the cache, not the source tree) as an installed package does, even where the caller's
# environment sets PYTHONDONTWRITEBYTECODE.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {
    "PYTHONPYCACHEPREFIX": str(CACHE / "pycache")
}
STARTUP_REPS_FACTOR = 3  # start-up is short, noisy, and subtracted from every other row: more runs
MAX_RESIDENT_MB = 30  # target for the tracer process
MAX_IDLE_CPU = 0.001  # target: CPU seconds per second of CMD's idle time

Medians = dict[str, float]  # mode -> median seconds
Check = Callable[[str, str], str]  # (mode, CMD's stdout + stderr) -> error message or ""


@dataclass
class Sample:
    """One run of one workload in one mode."""

    seconds: float
    rc: int = 0
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    """A timed workload: CMD = `argv`, run in every mode."""

    name: str  # as given to --only
    label: str  # first column of the table
    argv: list[str]  # empty: skipped, `note` says why
    count: int = 1  # operations per run, for the time added per operation
    unit: str = ""  # "spawn", "signal": report the time added per operation
    target: str = ""
    met: Callable[[Medians], bool] | None = None
    check: Check | None = None
    note: str = ""
    # (the monotonic clock when the command was started, CMD's stdout) -> the seconds reported,
    # instead of the wall time of the whole run
    measure: Callable[[float, str], float] | None = None
    net: bool = True  # whether "net" figures (less the start-up row) make sense for it
    launch: list[str] = field(default_factory=list)  # more vgpu-launch options for this row


@dataclass
class Row:
    label: str
    cells: dict[str, str]
    target: str = ""
    met: str = ""


# ---------------------------------------------------------------------------- building


def build_c(name: str, *flags: str, suffix: str = "") -> Path:
    """Compile bench/workloads/NAME.c (or bench/NAME.c) with -O2 into the cache, once per source."""
    src = BENCH / "workloads" / f"{name}.c"
    if not src.exists():
        src = BENCH / f"{name}.c"
    return _cached(src, flags, suffix, lambda out: ["gcc", "-O2", "-o", str(out), str(src), *flags])


def build_go(name: str) -> Path:
    src = BENCH / "workloads" / f"{name}.go"
    return _cached(src, (), "", lambda out: ["go", "build", "-o", str(out), str(src)])


def _cached(
    src: Path, flags: tuple[str, ...], suffix: str, command: Callable[[Path], list[str]]
) -> Path:
    key = hashlib.sha256(src.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    out = CACHE / f"{src.stem}-{key}{suffix}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        env = {**os.environ, "GOCACHE": str(CACHE / "go-build")}
        subprocess.run(command(tmp), check=True, env=env)
        tmp.rename(out)
    return out


# ---------------------------------------------------------------------------- workloads


def at_most(ratio: float) -> Callable[[Medians], bool]:
    """Target: vgpu-launch's median at most `ratio` times the direct one."""
    return lambda m: m["vgpu-launch"] <= ratio * m["direct"]


def workloads(spawn: list[str], scale: int) -> dict[str, Callable[[], Workload]]:
    """The timed workloads by name, each built only when selected. `spawn`: spawn.c, child.c."""
    n_sys, n_sig, n_spawn = 2_000_000 // scale, 20_000 // scale, 500 // scale
    n_thr = 10_000 // scale
    go_rounds = 24_000_000 // scale  # about 1.5 s on a 2-CPU AMD EPYC VM

    def c(name: str, *args: object) -> list[str]:
        return [str(build_c(name, "-pthread")), *map(str, args)]

    def released(w: Workload) -> Workload:
        """The same workload with its program given back right after its exec."""
        w.name += "-released"
        w.label += ", `release_after_exec` matching it"
        w.launch = ["--release-after-exec", f"{w.argv[0]} *"]
        w.target, w.met, w.unit = "≤ 1.02 × direct", at_most(1.02), ""
        return w

    def go_cpu() -> Workload:
        label = f"Go CPU-bound, {go_rounds:,} SHA-256 rounds"
        if not shutil.which("go"):
            return Workload("go-cpu", label, [], note="skipped: go not found")
        argv = [str(build_go("gocpu")), str(go_rounds)]
        return Workload("go-cpu", label, argv, target="≤ 1.01 × direct", met=at_most(1.01))

    return {
        "first-instruction": lambda: Workload(
            "first-instruction", "start-up: start → CMD's first instruction",
            [str(build_c("clock"))], target="≤ 30 ms", met=lambda m: m["vgpu-launch"] <= 0.030,
            check=lambda mode, out: "" if "monotonic=" in out else f"no clock line: {out[-300:]}",
            measure=first_instruction, net=False),
        "startup": lambda: Workload(
            "startup", "start-up: `CMD` = `/bin/true`", ["/bin/true"], 1, "run", "≤ 100 ms added",
            lambda m: m["vgpu-launch"] - m["direct"] <= 0.100),
        "syscall": lambda: Workload(
            "syscall", f"{n_sys:,} `getppid` syscalls", c("getppid", n_sys),
            target="≤ 1.02 × direct", met=at_most(1.02)),
        "signal": lambda: Workload(
            "signal", f"{n_sig:,} RT signals to itself, 4 threads", c("signals", n_sig),
            n_sig, "signal", "≤ 1.5 × strace's added cost",
            lambda m: m["vgpu-launch"] - m["direct"] <= 1.5 * (m["strace"] - m["direct"])),
        "spawn": lambda: Workload(
            "spawn", f"{n_spawn:,} `posix_spawn`s, empty env", [spawn[0], str(n_spawn), spawn[1]],
            n_spawn, "spawn", "≤ 1.6 × direct", at_most(1.6), check_injected),
        "thread": lambda: Workload(
            "thread", f"{n_thr:,} threads created + joined", c("threads", n_thr),
            target="≤ 2.5 × direct", met=at_most(2.5)),
        "syscall-unfiltered": lambda: Workload(
            "syscall-unfiltered", f"{n_sys:,} `getppid` syscalls, `--no-ptrace-requests`",
            c("getppid", n_sys), target="≤ 1.02 × direct", met=at_most(1.02),
            launch=["--no-ptrace-requests"]),
        "signal-released": lambda: released(Workload(
            "signal", f"{n_sig:,} RT signals to itself, 4 threads", c("signals", n_sig))),
        "thread-released": lambda: released(Workload(
            "thread", f"{n_thr:,} threads created + joined", c("threads", n_thr))),
        "go-cpu": go_cpu,
        "go-fixture": fixture,
    }  # fmt: skip


def first_instruction(started: float, output: str) -> float:
    """CMD printed the monotonic clock first thing in main(): the time since it was started."""
    line = next(ln for ln in output.splitlines() if ln.startswith("monotonic="))
    return float(line.split()[0].removeprefix("monotonic=")) - started


def check_injected(mode: str, output: str) -> str:
    """Under vgpu-launch every child spawned with an empty environment must have the library."""
    line = next((ln for ln in output.splitlines() if ln.startswith("preloaded=")), "")
    done, _, total = line.removeprefix("preloaded=").partition("/")
    if mode == "vgpu-launch" and (not done or done != total):
        return f"not every child got the preload library back ({line or 'no report'})"
    return ""


def fixture() -> Workload:
    """The ollama-like example: `serve --once` exits as soon as its GPU discovery is done."""
    name, label = "go-fixture", "ollama-like `serve`: start → discovery done"
    if not FIXTURE_BUILD.exists():
        return Workload(name, label, [], note=f"skipped: {FIXTURE_BUILD.relative_to(ROOT)} absent")
    outdir = CACHE / "ollama-like"
    build = subprocess.run([str(FIXTURE_BUILD), str(outdir)], capture_output=True, text=True)
    if build.returncode != 0:
        return Workload(name, label, [], note=f"skipped: build failed: {build.stderr.strip()}")

    def discovered(mode: str, output: str) -> str:
        return "" if "initial_count=" in output else f"no discovery result: {output[-500:]}"

    argv = [str(outdir / "ollama"), "serve", "--once"]
    return Workload(name, label, argv, check=discovered)


# ---------------------------------------------------------------------------- running


def prefix(mode: str, preload: Path, launch: list[str] | None = None) -> list[str]:
    if mode == "vgpu-launch":
        return [
            str(VGPU_LAUNCH),
            "--log-level",
            "warning",
            "--preload",
            str(preload),
            *(launch or []),
            "--",
        ]
    return STRACE if mode == "strace" else []


def run_timed(w: Workload, mode: str, preload: Path) -> Sample:
    """Wall time of one run; info["cpu_s"]: CPU time of the whole tree, tracer included."""
    cpu = _children_cpu()
    start = time.perf_counter()
    started = time.clock_gettime(time.CLOCK_MONOTONIC)
    proc = subprocess.run(
        prefix(mode, preload, w.launch) + w.argv,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    sample = Sample(time.perf_counter() - start, proc.returncode)
    sample.info["cpu_s"] = _children_cpu() - cpu
    if proc.returncode != 0:
        sample.error = f"exit status {proc.returncode}: {proc.stderr.strip()[-500:]}"
    elif w.check:
        sample.error = w.check(mode, proc.stdout + proc.stderr)
    if w.measure is not None and not sample.error:
        sample.info["run_s"] = sample.seconds
        sample.seconds = w.measure(started, proc.stdout)
    return sample


def run_alternating(
    w: Workload, modes: tuple[str, ...], reps: int, preload: Path
) -> dict[str, list[Sample]]:
    """One warm-up round, then `reps` rounds of the modes in turn (A B C A B C ...)."""
    samples: dict[str, list[Sample]] = {mode: [] for mode in modes}
    for rep in range(reps + 1):
        for mode in modes:
            sample = run_timed(w, mode, preload)
            if rep or sample.error:  # a failed warm-up is reported
                samples[mode].append(sample)
        if any(s.error for ss in samples.values() for s in ss):
            break  # no point in repeating a failure
    return samples


def tracer_cost(mode: str, preload: Path, spawn: list[str], spawns: int, hold: float) -> Sample:
    """Resident memory and CPU time of the tracer process itself (the TracerPid of CMD).

    CMD spawns `spawns` children, says "ready PID", sleeps `hold` seconds, says "done" and waits
    for its stdin to close. Memory is read at "ready"; idle CPU time is the tracer's CPU time at
    "done" less that at "ready".
    """
    argv = [*prefix(mode, preload), spawn[0], str(spawns), spawn[1], "--hold", f"{hold:g}"]
    info: dict[str, Any] = {"hold_s": hold}
    start = time.perf_counter()
    with (
        tempfile.TemporaryFile() as stderr,
        subprocess.Popen(
            argv, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
        ) as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        ready = _read_until(proc.stdout, "ready").split()
        tracer = int(_status(int(ready[1]))["TracerPid"]) if ready else 0
        if tracer:
            tracer = int(_status(tracer)["Tgid"])  # TracerPid may name a thread of the tracer
            status, cpu = _status(tracer), _cpu_seconds(tracer)
            _read_until(proc.stdout, "done")
            info |= {
                "tracer_pid": tracer,
                "tracer_cmdline": _cmdline(tracer),
                "vm_hwm_kb": int(status["VmHWM"].split()[0]),
                "vm_rss_kb": int(status["VmRSS"].split()[0]),
                "idle_cpu_s": _cpu_seconds(tracer) - cpu,
            }
        proc.stdin.close()
        proc.stdout.read()
        rc = proc.wait()
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace").strip()[-500:]
    sample = Sample(time.perf_counter() - start, rc, info=info)
    if rc != 0 or not tracer:
        sample.error = f"exit status {rc}, tracer pid {tracer}: {errors}"
    return sample


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()[:300]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _read_until(stream: IO[str], word: str) -> str:
    """The first line of `stream` that starts with `word`, or '' at end of file."""
    return next((line for line in stream if line.startswith(word)), "")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (ln.partition(":") for ln in lines)}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# ---------------------------------------------------------------------------- reporting


def fmt_seconds(seconds: float) -> str:
    if abs(seconds) >= 1:
        return f"{seconds:.2f} s"
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def medians(samples: dict[str, list[Sample]], measure: str = "wall") -> Medians:
    """Median seconds by mode, for the modes whose runs all succeeded: wall time, or ("cpu")
    the CPU time of the whole tree, tracer included."""
    return {
        mode: statistics.median(s.seconds if measure == "wall" else s.info["cpu_s"] for s in ss)
        for mode, ss in samples.items()
        if ss and not any(s.error for s in ss)
    }


def timed_row(w: Workload, med: Medians, modes: tuple[str, ...], startup: Medians) -> Row:
    """`startup`: the start-up time each tracing mode adds (from the start-up workload, if run);
    "net" figures subtract it, leaving the cost while CMD runs."""
    net = {mode: t - startup.get(mode, 0.0) for mode, t in med.items()}
    cells = {}
    for mode in modes:
        if mode not in med:
            cells[mode] = "failed"
        elif mode == "direct" or "direct" not in med:
            cells[mode] = fmt_seconds(med[mode])
        else:
            cell = f"{fmt_seconds(med[mode])} ({med[mode] / med['direct']:.2f}×"
            if mode in startup:
                cell += f"; net {net[mode] / med['direct']:.2f}×"
            if w.unit:
                added = (net[mode] - med["direct"]) / w.count
                sign = "+" if added >= 0 else "−"
                cell += f", {sign}{fmt_seconds(abs(added))}/{w.unit}"
            cells[mode] = cell + ")"
    met = ""
    if w.met and "vgpu-launch" in med:
        with contextlib.suppress(KeyError):  # the target compares with a mode that was not run
            met = "yes" if w.met(net) else "no"
    return Row(w.label, cells, w.target, met)


def tracer_row(label: str, target: str, samples: dict[str, Sample], what: str) -> Row:
    """A row about the tracer process itself: `what` is "memory" or "cpu"."""
    cells, met = {"direct": "—"}, ""
    for mode, s in samples.items():
        if s.error:
            cells[mode] = "failed"
            continue
        if what == "memory":
            hwm, rss = (s.info[k] * 1024 / 1e6 for k in ("vm_hwm_kb", "vm_rss_kb"))
            cells[mode] = f"peak {hwm:.1f} MB, now {rss:.1f} MB"
            ok = hwm <= MAX_RESIDENT_MB
        else:
            cells[mode] = f"{s.info['idle_cpu_s'] * 1e3:.0f} ms"
            ok = s.info["idle_cpu_s"] <= MAX_IDLE_CPU * s.info["hold_s"]
        if mode == "vgpu-launch":
            met = "yes" if ok else "no"
    return Row(label, cells, target, met)


def table(rows: list[Row], modes: tuple[str, ...]) -> str:
    heads = {"direct": "direct", "vgpu-launch": "vgpu-launch", "strace": "strace --seccomp-bpf"}
    header = ["workload", *(heads[m] for m in modes), "target (vgpu-launch)", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label, *(row.cells.get(m, "") for m in modes), row.target, row.met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "not available"
        return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else "?"

    return {
        "cpus": str(len(os.sched_getaffinity(0))),
        "cpu": cpu or platform.machine(),
        "kernel": platform.release(),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "commit": version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "python": platform.python_version(),
        "strace": version(["strace", "-V"]),
        "go": version(["go", "version"]),
        "vgpu-launch": version([str(VGPU_LAUNCH), "--version"]),
    }


# ---------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (about a minute)")
    parser.add_argument("--reps", type=int, help="timed rounds per workload (default 7, quick 3)")
    parser.add_argument("--only", help="comma-separated workload names (default: all)")
    parser.add_argument("--idle-seconds", type=float, help="CMD's idle time (default 60, quick 2)")
    parser.add_argument("--modes", default=",".join(MODES), help="default: %(default)s")
    parser.add_argument(
        "--launch-options",
        default="",
        metavar="OPTIONS",
        help="more vgpu-launch options for every run, e.g. --launch-options=--no-ptrace-requests",
    )
    parser.add_argument(
        "--measure",
        choices=("wall", "cpu"),
        default="wall",
        help="timed rows: wall time, or CPU time of the whole tree (less "
        "sensitive to other load on the machine); default: %(default)s",
    )
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    reps = args.reps or (3 if args.quick else 7)
    idle = args.idle_seconds if args.idle_seconds is not None else (2 if args.quick else 60)
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    if not modes or set(args.modes.split(",")) - set(MODES):
        sys.exit(f"bench: --modes takes some of {','.join(MODES)}")
    if "strace" in modes and not shutil.which("strace"):
        sys.exit("bench: strace is not installed (Debian: apt-get install strace)")

    preload = build_c("noop-preload", "-shared", "-fPIC", suffix=".so")
    spawn = [str(build_c("spawn")), str(build_c("child"))]
    timed = workloads(spawn, scale)
    n_mem = 10_000 // scale
    tracer_rows = [  # (name, label, target, spawns before "ready", idle seconds, what)
        ("memory", "tracer resident memory, at rest", "≤ 30 MB", 0, 0.0, "memory"),
        (
            "memory",
            f"tracer resident memory, after {n_mem:,} spawns",
            "≤ 30 MB",
            n_mem,
            0.0,
            "memory",
        ),
        ("idle", f"tracer CPU time while CMD sleeps {idle:g} s", "≈ 0 (≤ 0.1 %)", 0, idle, "cpu"),
    ]
    names = [*timed, "memory", "idle"]
    only = args.only.split(",") if args.only else names
    if set(only) - set(names):
        sys.exit(f"bench: unknown workload in --only; known: {','.join(names)}")

    info = machine()  # before the runs: the load average says whether the machine was quiet
    rows: list[Row] = []
    raw: dict[str, dict[str, Any]] = {}
    startup: Medians = {}  # start-up time added by each tracing mode, once measured
    started = time.perf_counter()
    for name in (n for n in timed if n in only):
        w = timed[name]()
        w.launch = [*shlex.split(args.launch_options), *w.launch]
        if not w.argv:
            rows.append(Row(w.label, {modes[0]: w.note}))
            raw[name] = {"skipped": w.note}
            continue
        short = name in ("startup", "first-instruction")
        rounds = reps * STARTUP_REPS_FACTOR if short else reps
        print(f"bench: {name}: {rounds} rounds of {', '.join(modes)}", file=sys.stderr)
        samples = run_alternating(w, modes, rounds, preload)
        raw[name] = {mode: [asdict(s) for s in ss] for mode, ss in samples.items()}
        med = medians(samples, args.measure)
        rows.append(timed_row(w, med, modes, startup if w.net else {}))
        if name == "startup" and "direct" in med:
            startup = {mode: t - med["direct"] for mode, t in med.items() if mode != "direct"}
    tracers = tuple(m for m in modes if m != "direct")
    for name, label, target, spawns, hold, what in tracer_rows:
        if name not in only or not tracers:
            continue
        print(f"bench: {name}: {spawns} spawns, {hold:g} s idle", file=sys.stderr)
        by_mode = {m: tracer_cost(m, preload, spawn, spawns, hold) for m in tracers}
        raw[f"{name}, {spawns} spawns, {hold:g} s idle"] = {
            m: [asdict(s)] for m, s in by_mode.items()
        }
        rows.append(tracer_row(label, target, by_mode, what))
    print(f"bench: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    command = shlex.join(["python3", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    print(f"Command: `{command}`\n")
    print(
        f"Machine: {info['cpus']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"load average {info['load']} before the run; Python {info['python']}, "
        f"{info['strace']}, {info['go']}; {info['vgpu-launch']} ({info['commit']})\n"
    )
    measured = (
        ""
        if args.measure == "wall"
        else ("times are CPU time of the whole tree (tracer included), not wall time; ")
    )
    print(
        f"Medians of {reps} alternating runs per mode ({reps * STARTUP_REPS_FACTOR} for "
        f"start-up), after one warm-up round; {measured}"
        "ratio = median(mode) / median(direct); net = less the mode's start-up time (first row), "
        "which per-operation figures and targets use. "
        "Tracer rows: the process named by CMD's TracerPid, one run each.\n"
    )
    print(table(rows, modes))

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"command": command, "machine": info, "table": [asdict(r) for r in rows], "runs": raw}
    out.write_text(json.dumps(report, indent=1))
    print(f"\nRaw results: {out.relative_to(ROOT)}")

    errors = [
        f"{name} [{mode}]: {s['error']}"
        for name, by_mode in raw.items()
        if "skipped" not in by_mode
        for mode, ss in by_mode.items()
        for s in ss
        if s["error"]
    ]
    for error in errors:
        print(f"bench: FAILED {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
