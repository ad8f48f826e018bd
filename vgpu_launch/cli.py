"""The command line: ``vgpu-launch [OPTIONS] -- CMD [ARG...]``, ``doctor``, ``status``.

The entry point: it dispatches and turns errors into one line and an exit code. What the
options are is ``options.py``'s; nothing imports this module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import deps, sigstate
from .config import load
from .errors import EXIT_CANNOT_TRACE, LaunchError
from .options import SUBCOMMANDS, parse_launcher, split_command


def _die(message: str, code: int) -> NoReturn:
    if "vgpu_launch.log" in sys.modules:  # events queued before the failure come first
        sys.modules["vgpu_launch.log"].shutdown()
    sys.stderr.write(f"vgpu-launch: {message}\n")
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sigs = sigstate.capture(os.environ)  # first: before anything could change dispositions
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "release":
            from . import control

            sys.exit(control.main(args[1:]))
        if args and args[0] in SUBCOMMANDS:
            # imported here: a run of CMD does not pay for the diagnostics' imports
            from .diagnostics import commands

            sys.exit(commands.main(args[0], args[1:]))
        options, command = split_command(args)
        values, config_path = parse_launcher(options)
        cfg = load(values, os.environ, config_path=config_path)
        if not command:
            raise LaunchError("no command given: vgpu-launch [OPTIONS] -- CMD [ARG...]")
        deps.require()
        # structlog, prctl and ptrace are imported only for a run, not for doctor or status
        from . import log

        log.configure(
            cfg.log_format, cfg.log_level, cfg.log_file, level_set="log_level" in cfg.sources
        )
        from .launcher import Launcher

        Launcher(cfg, command, sigs).run()
    except LaunchError as exc:
        _die(str(exc), exc.code)
    except OSError as exc:
        _die(
            f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
            EXIT_CANNOT_TRACE,
        )
    except ModuleNotFoundError as exc:
        dep = deps.by_module(exc.name)
        if dep is None:
            raise
        _die(deps.missing_message([dep]), EXIT_CANNOT_TRACE)
    except KeyboardInterrupt:  # pragma: no cover - signals are blocked once CMD runs
        _die("interrupted", 130)
