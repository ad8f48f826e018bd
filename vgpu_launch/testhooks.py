"""Fault injection for the test suite, which a deployment cannot switch on by accident.

``VGPU_LAUNCH_TEST_FAULT`` holds comma-separated faults:

- ``exec:N``: the tracer raises at the Nth exec (what the tree does when the tracer dies);
- ``kill-exec:N``: from the Nth exec on, the tracer SIGKILLs each process it holds at its exec
  event before injecting (a process killed there by another, made certain);
- ``slow-start:MS``: the main thread sleeps MS milliseconds before its start-up events (a
  machine so busy that CMD ends before they are logged);
- ``slow-exit:MS``: after a failure, the tracer thread sleeps MS milliseconds once it has
  woken the main thread (a thread the scheduler runs late: until it has ended, the kernel
  still counts the tree as traced).

The variable is honoured only while vgpu-launch holds an open descriptor of
a memfd named ``vgpu-launch-test-hooks``, which the test suite creates and hands down: an
environment copied into a unit file or a shell profile cannot carry it. Otherwise the variable
is ignored and the start says so in a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import procfs

FAULT_VAR = "VGPU_LAUNCH_TEST_FAULT"
MEMFD_NAME = "vgpu-launch-test-hooks"


def enabled() -> bool:
    """Whether a descriptor of the test suite's memfd is open in this process."""
    return f"/memfd:{MEMFD_NAME} (deleted)" in procfs.fd_targets()


@dataclass(frozen=True)
class Faults:
    exec_at: int = 0  # the tracer raises at this exec (0: never)
    kill_from_exec: int = 0  # the tracer kills the process of this exec and of every later one
    start_delay: float = 0.0  # seconds the main thread waits before its start-up events
    exit_delay: float = 0.0  # seconds a failed tracer thread waits before it ends


def faults(environ: Mapping[str, str]) -> tuple[Faults, str | None]:
    """(the faults asked for, why the variable was ignored)."""
    spec = environ.get(FAULT_VAR, "")
    if not spec:
        return Faults(), None
    if not enabled():
        return (
            Faults(),
            f"{FAULT_VAR} is set but ignored: it works only under vgpu-launch's test suite",
        )
    exec_at, kill_from, delay, exit_delay = 0, 0, 0.0, 0.0
    for item in spec.split(","):
        kind, _, n = item.partition(":")
        if not n.isdigit():
            continue
        if kind == "exec":
            exec_at = int(n)
        elif kind == "kill-exec":
            kill_from = int(n)
        elif kind == "slow-start":
            delay = int(n) / 1000
        elif kind == "slow-exit":
            exit_delay = int(n) / 1000
    return Faults(exec_at, kill_from, delay, exit_delay), None
