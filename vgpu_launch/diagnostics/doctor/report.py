"""The whole doctor run: every check in order, then the report as text or JSON."""

from __future__ import annotations

import json
import sys
from typing import IO

from ...errors import EXIT_PROBLEM_FOUND
from .. import verify
from ..effective import effective_config
from ..systemd import Unit, UnitError, load_unit
from .configuration import check_config
from .library import check_library, service_user
from .ptrace_probe import check_ptrace
from .result import FAIL, WARN, Checks
from .unit import check_unit


def collect(
    preload_given: list[str] | None, unit_name: str | None, config_path: str | None
) -> Checks:
    checks = Checks()
    unit: Unit | None = None
    if unit_name:
        try:
            unit = load_unit(unit_name)
        except UnitError as exc:
            checks.add(
                FAIL,
                f"unit {unit_name}",
                str(exc),
                "run doctor where systemd runs the unit (as root, or with permission to query it)",
            )
    check_ptrace(checks, unit)
    eff = effective_config(preload_given, config_path, unit)
    cfg = check_config(checks, eff, bool(preload_given))
    if cfg is not None:
        user = service_user(unit)
        for lib in cfg.preload:
            try:
                check_library(checks, lib, cfg.sources.get("preload", ""), user, cfg)
            except Exception as exc:  # one broken check must not hide the others
                checks.add(FAIL, f"library {lib}", f"the check itself failed: {exc}")
    if unit is not None:
        libs: dict[str, str] = {}
        for lib in cfg.preload if cfg is not None else []:
            file = verify.expand(lib, 8)
            if file:
                libs[lib] = file
        check_unit(checks, unit, libs)
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
    out.write(f"{fails} failed, {warns} warnings, {len(checks) - fails - warns} ok\n")


def run(
    preload_given: list[str] | None,
    unit_name: str | None,
    config_path: str | None,
    fmt: str,
    out: IO[str] | None = None,
) -> int:
    out = out or sys.stdout
    checks = collect(preload_given, unit_name, config_path)
    if fmt == "json":
        json.dump({"checks": [c.to_json() for c in checks], "ok": not checks.failed}, out, indent=2)
        out.write("\n")
    else:
        render_text(checks, out)
    return EXIT_PROBLEM_FOUND if checks.failed else 0
