"""The command line: ``vgpu-launch [OPTIONS] -- CMD [ARG...]``, ``doctor``, ``status``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .config import DEFAULT_CONFIG, LOG_FORMATS, LOG_LEVELS, load
from .errors import EXIT_USAGE, LaunchError

DESCRIPTION = """\
Start CMD with the preload libraries in LD_PRELOAD and keep them there: every program that
CMD's process tree executes with an environment lacking them (a runner started with a rebuilt
environment, `env -i`, Go's os/exec) gets them back before its first instruction, together
with the --env variables. Every exec is logged as a structured decision on stderr.
"""

EPILOG = f"""\
subcommands:
  vgpu-launch doctor [--preload PATH] [--unit NAME] [--format json]
                        check this host: ptrace, preload libraries, configuration, a unit
  vgpu-launch status [PID | --unit NAME] [--format json]
                        which processes of a tree really have the preload mapped
  vgpu-launch release PID [PID...] [--tree]
                        give processes back from the vgpu-launch that traces them, so
                        that a debugger can attach (gdb -p, py-spy dump, strace -p)

environment variables (below the command line, above the configuration file):
  VGPU_LAUNCH_PRELOAD (paths separated by ':' or spaces), VGPU_LAUNCH_ENV and
  VGPU_LAUNCH_FORCE_ENV (NAME=VALUE separated by spaces), VGPU_LAUNCH_EXCLUDE,
  VGPU_LAUNCH_LOG_FORMAT, VGPU_LAUNCH_LOG_LEVEL, VGPU_LAUNCH_LOG_FILE,
  VGPU_LAUNCH_NO_FOLLOW, VGPU_LAUNCH_STRICT (1/0), VGPU_LAUNCH_ALLOW_INSECURE,
  VGPU_LAUNCH_RELEASE_AFTER_EXEC (patterns separated by ';'),
  VGPU_LAUNCH_STRICT_ALLOW_RELEASE (1/0), VGPU_LAUNCH_PTRACE_REQUESTS (1/0),
  VGPU_LAUNCH_CONFIG (the configuration file; default {DEFAULT_CONFIG})

exit status:
  CMD's own exit status; if CMD is killed by a signal, vgpu-launch dies of the same signal
  (128+N when it is PID 1). 2: bad command line, configuration or preload library;
  125: vgpu-launch cannot run CMD here (e.g. ptrace refused); 126: CMD is not executable;
  127: CMD not found.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vgpu-launch",
        usage="vgpu-launch [OPTIONS] -- CMD [ARG...]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preload",
        action="append",
        metavar="PATH",
        help="library guaranteed in LD_PRELOAD (repeatable, order kept; $LIB, $PLATFORM and "
        "$ORIGIN are left for ld.so to expand)",
    )
    p.add_argument(
        "--env",
        action="append",
        metavar="NAME=VALUE",
        help="variable set wherever a program's environment lacks it (repeatable)",
    )
    p.add_argument(
        "--force-env",
        action="append",
        metavar="NAME=VALUE",
        help="variable set everywhere, overriding a different value (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="programs left exactly as they are: a glob on the absolute path if it starts "
        "with '/', else on the basename (repeatable)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="fail closed: kill any process that would run without the preload, "
        "and the whole tree if vgpu-launch dies",
    )
    p.add_argument(
        "--strict-allow-release",
        action="store_true",
        default=None,
        help="with --strict: still let processes be given back, on request (vgpu-launch "
        "release) and when a process of the tree asks to trace one (strace, gdb, "
        "LeakSanitizer)",
    )
    p.add_argument(
        "--no-ptrace-requests",
        dest="ptrace_requests",
        action="store_false",
        default=None,
        help="do not hand the tree's own ptrace requests over (strace, gdb, LeakSanitizer in "
        "the tree then get EPERM), and spare every system call of the tree the seccomp "
        "filter's cost",
    )
    p.add_argument(
        "--release-after-exec",
        action="append",
        metavar="GLOB",
        help="give back a program right after its exec (once injected) when GLOB matches "
        "its path and arguments, \"EXE ARG1 ARG2...\" joined by spaces; its threads and "
        "signals then cost nothing, and the programs it starts are not followed "
        "(repeatable; refused with --strict)",
    )
    p.add_argument(
        "--no-follow",
        action="store_true",
        default=None,
        help="only set the variables for CMD and exec it, without tracing (for "
        "hosts where ptrace is forbidden)",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="default: console when stderr is a terminal, JSON lines otherwise",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default: info")
    p.add_argument("--log-file", metavar="PATH", help="also append JSON lines to PATH")
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG} if it exists)",
    )
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        default=None,
        help="accept preload libraries and configuration files that users other "
        "than root or the file's owner can write",
    )
    p.add_argument("--version", action="version", version=f"vgpu-launch {__version__}")
    return p


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise LaunchError(f"{message} (see vgpu-launch --help)", EXIT_USAGE)


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Options before CMD, and CMD with its arguments: CMD starts after ``--`` or at the
    first argument that is neither an option nor an option's value."""
    takes_value = {
        "--preload",
        "--env",
        "--force-env",
        "--exclude",
        "--log-format",
        "--log-level",
        "--log-file",
        "--config",
        "--release-after-exec",
    }
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return list(argv[:i]), list(argv[i + 1 :])
        if not arg.startswith("-") or arg == "-":
            return list(argv[:i]), list(argv[i:])
        i += 2 if arg in takes_value else 1
    return list(argv), []


def _cli_values(ns: argparse.Namespace) -> dict[str, Any]:
    from .config import merge_cli_lists

    values: dict[str, Any] = {}
    for key in (
        "preload",
        "exclude",
        "log_format",
        "log_level",
        "log_file",
        "strict",
        "no_follow",
        "allow_insecure",
        "release_after_exec",
        "strict_allow_release",
        "ptrace_requests",
    ):
        v = getattr(ns, key)
        if v is not None:
            values[key] = v
    for key, flag in (("env", "--env"), ("force_env", "--force-env")):
        pairs = merge_cli_lists(getattr(ns, key), flag)
        if pairs is not None:
            values[key] = pairs
    return values


def _die(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"vgpu-launch: {message}\n")
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    from . import sigstate

    sigs = sigstate.capture(os.environ)  # first: before anything could change dispositions
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in ("doctor", "status"):
            from .diagnostics import commands as diagnostics

            sys.exit(diagnostics.main(args[0], args[1:]))
        if args and args[0] == "release":
            from . import control

            sys.exit(control.main(args[1:]))
        options, command = split_command(args)
        parser = build_parser()
        parser.__class__ = _Parser
        ns = parser.parse_args(options)
        cfg = load(_cli_values(ns), os.environ, config_path=ns.config)
        if not command:
            raise LaunchError("no command given: vgpu-launch [OPTIONS] -- CMD [ARG...]")
        from . import log

        log.configure(cfg.log_format, cfg.log_level, cfg.log_file)
        from .launcher import Launcher

        Launcher(cfg, command, sigs).run()
    except LaunchError as exc:
        _die(str(exc), exc.code)
    except OSError as exc:
        _die(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", 125)
    except KeyboardInterrupt:  # pragma: no cover - signals are blocked once CMD runs
        _die("interrupted", 130)
