"""The whole doctor run: every check in order, then the report as text or JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import IO

from ...errors import EXIT_PROBLEM_FOUND
from .. import verify
from ..effective import effective_config
from ..systemd import Unit, UnitError, load_unit
from .configuration import check_config
from .library import check_library, service_user
from .programs import check_programs
from .ptrace_probe import check_ptrace
from .result import FAIL, NOTE, WARN, Checks
from .unit import check_unit


@dataclass(frozen=True)
class Request:
    """What ``vgpu-launch doctor`` was asked (its options)."""

    preload: list[str] | None = None  # --preload: check these instead of the configuration's
    unit: str | None = None
    config: str | None = None
    check: list[str] = field(default_factory=list)  # --check PROGRAM
    show_values: bool = False
    format: str = "text"


def collect(request: Request) -> Checks:
    checks = Checks()
    unit: Unit | None = None
    if request.unit:
        try:
            unit = load_unit(request.unit)
        except UnitError as exc:
            checks.add(
                FAIL,
                f"unit {request.unit}",
                str(exc),
                "run doctor where systemd runs the unit (as root, or with permission to query it)",
            )
    check_ptrace(checks, unit)
    eff = effective_config(request.preload, request.config, unit)
    cfg = check_config(checks, eff, bool(request.preload), request.show_values)
    programs = check_programs(checks, request.check, unit)
    if cfg is not None:
        user = service_user(unit)
        for lib in cfg.preload:
            try:
                check_library(checks, lib, cfg.sources.get("preload", ""), user, cfg, programs)
            except Exception as exc:  # one broken check must not hide the others
                checks.add(FAIL, f"library {lib}", f"the check itself failed: {exc}")
    if unit is not None:
        libs: dict[str, str] = {}
        for lib in cfg.preload if cfg is not None else []:
            file = verify.expand(lib, 8)
            if file:
                libs[lib] = file
        check_unit(checks, unit, libs, request.show_values)
    return checks


def render_text(checks: Checks, out: IO[str]) -> None:
    width = min(44, max(len(c.what) for c in checks)) if checks else 0
    for c in checks:
        line = f"{c.status.value:<4}  {c.what:<{width}}  {c.why}"
        if c.fix:
            line += f"  -> fix: {c.fix}"
        out.write(line + "\n")
    fails = sum(c.status is FAIL for c in checks)
    warns = sum(c.status is WARN for c in checks)
    notes = sum(c.status is NOTE for c in checks)
    oks = len(checks) - fails - warns - notes
    out.write(f"{fails} failed, {warns} warnings, {notes} notes, {oks} ok\n")


def run(request: Request, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    checks = collect(request)
    if request.format == "json":
        json.dump({"checks": [c.to_json() for c in checks], "ok": not checks.failed}, out, indent=2)
        out.write("\n")
    else:
        render_text(checks, out)
    return EXIT_PROBLEM_FOUND if checks.failed else 0
