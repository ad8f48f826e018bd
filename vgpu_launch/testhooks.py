"""Fault injection for the test suite, which a deployment cannot switch on by accident.

``VGPU_LAUNCH_TEST_FAULT=exec:N`` makes the tracer raise at the Nth exec (tests of what the tree
does when the tracer dies). It is honoured only while vgpu-launch holds an open descriptor of
a memfd named ``vgpu-launch-test-hooks``, which the test suite creates and hands down: an
environment copied into a unit file or a shell profile cannot carry it. Otherwise the variable
is ignored and the start says so in a warning.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import procfs

FAULT_VAR = "VGPU_LAUNCH_TEST_FAULT"
MEMFD_NAME = "vgpu-launch-test-hooks"


def enabled() -> bool:
    """Whether a descriptor of the test suite's memfd is open in this process."""
    return f"/memfd:{MEMFD_NAME} (deleted)" in procfs.fd_targets()


def fault_at_exec(environ: Mapping[str, str]) -> tuple[int, str | None]:
    """(the exec at which the tracer must fail, 0: never; why the variable was ignored)."""
    spec = environ.get(FAULT_VAR, "")
    if not spec:
        return 0, None
    if not enabled():
        return 0, f"{FAULT_VAR} is set but ignored: it works only under vgpu-launch's test suite"
    kind, _, n = spec.partition(":")
    return (int(n) if kind == "exec" and n.isdigit() else 0), None
