"""``vgpu-launch doctor`` and ``vgpu-launch status``: parse the subcommand's arguments (the
parsers are ``options.py``'s) and run it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import deps
from ..errors import EXIT_CANNOT_TRACE, EXIT_USAGE, LaunchError
from ..options import subcommand_parser
from .effective import effective_config
from .systemd import Unit, UnitError, load_unit


def main(name: str, args: Sequence[str]) -> int:
    try:
        if name == "doctor":
            ns = subcommand_parser(name).parse_args(list(args))
            deps.require(f"vgpu-launch {name}")  # the ptrace probe imports python-ptrace
            from . import doctor

            request = doctor.Request(
                preload=ns.preload,
                unit=ns.unit,
                config=ns.config,
                check=ns.check or [],
                show_values=ns.show_values,
                format=ns.format,
            )
            return doctor.run(request)
        if name == "status":
            ns = subcommand_parser(name).parse_args(list(args))
            if ns.pid is not None and ns.unit:
                raise LaunchError("vgpu-launch status: give PID or --unit, not both", EXIT_USAGE)
            return _status(ns)
    except LaunchError as exc:
        sys.stderr.write(f"{exc}\n")
        return exc.code
    except BrokenPipeError:
        return 0
    except ModuleNotFoundError as exc:  # one the up-front check could not foresee
        dep = deps.by_module(exc.name)
        if dep is None:
            raise
        sys.stderr.write(f"vgpu-launch {name}: {deps.missing_message([dep])}\n")
        return EXIT_CANNOT_TRACE
    sys.stderr.write(f"vgpu-launch: unknown subcommand {name}\n")
    return EXIT_USAGE


def _status(ns: argparse.Namespace) -> int:
    from . import status

    unit: Unit | None = None
    cgroup: str | None = None
    if ns.unit:
        try:
            unit = load_unit(ns.unit)
        except UnitError as exc:
            sys.stderr.write(f"vgpu-launch status: {exc}\n")
            return EXIT_USAGE
        cgroup = unit.get("ControlGroup")
        if not cgroup:
            sys.stderr.write(f"vgpu-launch status: unit {ns.unit} has no cgroup (not running)\n")
            return EXIT_USAGE
    libs: list[str] | None = None
    source = ""
    if ns.preload:
        libs, source = list(ns.preload), "--preload"
    else:
        eff = effective_config(None, ns.config, unit)
        if eff.config is not None and eff.config.preload:
            libs = eff.config.preload
            source = eff.config.sources.get("preload", "configuration")
        elif eff.error:
            sys.stderr.write(f"vgpu-launch status: configuration not used: {eff.error}\n")
    return status.run(ns.pid, ns.unit, libs, source, ns.format, unit_cgroup=cgroup)
