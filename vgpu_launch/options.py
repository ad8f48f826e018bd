"""The one option schema of ``vgpu-launch``, ``vgpu-launch doctor`` and ``vgpu-launch status``.

Every option of the launcher is one ``Option`` in ``OPTIONS``. A *setting* (an option that is
also a configuration key) gets its command-line flag (``--force-env``), its environment
variable (``VGPU_LAUNCH_FORCE_ENV``) and its configuration-file key (``force_env``) from its
one name. The parser, ``split_command``, the command-line values handed to ``config.load``,
the configuration keys (``SETTINGS``) and the manual page are all derived from this table:
adding an option means adding one entry here (and describing it in the docs).

A leaf module: it imports nothing of vgpu_launch but ``errors`` and ``deps`` (for --version).
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from . import deps
from .errors import EXIT_CANNOT_TRACE, EXIT_USAGE, ConfigError, LaunchError

PROG = "vgpu-launch"
DEFAULT_CONFIG = "/etc/vgpu-launch/vgpu-launch.conf"
ENV_PREFIX = "VGPU_LAUNCH_"
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
# VGPU_LAUNCH_ variables that are not options: the test hook, bin/vgpu-launch's interpreter.
OTHER_VARS = ("VGPU_LAUNCH_TEST_FAULT", "VGPU_LAUNCH_PYTHON")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Kind(enum.Enum):
    """What an option takes, which decides how every source spells and checks it."""

    PATHS = "paths"  # repeatable; ':' or whitespace separated in a variable; a list in the file
    GLOBS = "globs"  # repeatable patterns that may hold spaces; ';' separated in a variable
    ASSIGNMENTS = "assignments"  # repeatable NAME=VALUE; space separated; a table in the file
    CHOICE = "choice"  # one of Option.choices
    PATH = "path"  # one path; "" for none
    BOOL = "bool"  # a flag; 1/0, true/false, yes/no in a variable; true/false in the file
    CONFIG = "config"  # --config: which file to read, not a setting of its own
    VERSION = "version"  # --version
    VERBOSE = "verbose"  # -v, -vv: a shorthand for --log-level info, debug


@dataclass(frozen=True)
class Option:
    name: str  # the configuration key and the Config attribute; the flag uses '-' for '_'
    kind: Kind
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    short: str | None = None  # "-v"
    negative: bool = False  # a BOOL that is on by default: the flag is --no-NAME

    @property
    def flag(self) -> str:
        return ("--no-" if self.negative else "--") + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.short, self.flag) if self.short else (self.flag,)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def is_setting(self) -> bool:
        """A configuration key: in the file, in a variable and on the command line."""
        return self.kind not in (Kind.CONFIG, Kind.VERSION, Kind.VERBOSE)


# In the order --help and the manual page show them.
OPTIONS: tuple[Option, ...] = (
    Option(
        "preload",
        Kind.PATHS,
        metavar="PATH",
        help="library guaranteed in LD_PRELOAD (repeatable, order kept; $LIB, $PLATFORM and "
        "$ORIGIN are left for ld.so to expand)",
    ),
    Option(
        "env",
        Kind.ASSIGNMENTS,
        metavar="NAME=VALUE",
        help="variable set wherever a program's environment lacks it (repeatable)",
    ),
    Option(
        "force_env",
        Kind.ASSIGNMENTS,
        metavar="NAME=VALUE",
        help="variable set everywhere, overriding a different value (repeatable)",
    ),
    Option(
        "exclude",
        Kind.PATHS,
        metavar="PATTERN",
        help="programs left exactly as they are: a glob on the absolute path if it starts "
        "with '/', else on the basename (repeatable)",
    ),
    Option(
        "strict",
        Kind.BOOL,
        help="fail closed: kill any process that would run without the preload, "
        "and the whole tree if vgpu-launch dies",
    ),
    Option(
        "strict_allow_release",
        Kind.BOOL,
        help="with --strict: still let processes be given back, on request (vgpu-launch "
        "release) and when a process of the tree asks to trace one (strace, gdb, "
        "LeakSanitizer)",
    ),
    Option(
        "ptrace_requests",
        Kind.BOOL,
        negative=True,
        help="do not hand the tree's own ptrace requests over (strace, gdb, LeakSanitizer in "
        "the tree then get EPERM), and spare every system call of the tree the seccomp "
        "filter's cost",
    ),
    Option(
        "release_after_exec",
        Kind.GLOBS,
        metavar="GLOB",
        help="give back a program right after its exec (once injected) when GLOB matches "
        'its path and arguments, "EXE ARG1 ARG2..." joined by spaces; its threads and '
        "signals then cost nothing, and the programs it starts are not followed "
        "(repeatable; refused with --strict)",
    ),
    Option(
        "no_follow",
        Kind.BOOL,
        help="only set the variables for CMD and exec it, without tracing (for "
        "hosts where ptrace is forbidden)",
    ),
    Option(
        "log_format",
        Kind.CHOICE,
        choices=LOG_FORMATS,
        help="default: console when stderr is a terminal, JSON lines otherwise",
    ),
    Option(
        "log_level",
        Kind.CHOICE,
        choices=LOG_LEVELS,
        help="default: info; on a terminal with no --log-format: warnings and a summary line",
    ),
    Option(
        "verbose",
        Kind.VERBOSE,
        short="-v",
        help="-v: log every decision (--log-level info), -vv: debug",
    ),
    Option("log_file", Kind.PATH, metavar="PATH", help="also append JSON lines to PATH"),
    Option(
        "config",
        Kind.CONFIG,
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG} if it exists)",
    ),
    Option(
        "allow_insecure",
        Kind.BOOL,
        help="accept preload libraries and configuration files that users other "
        "than root or the file's owner can write",
    ),
    Option(
        "version",
        Kind.VERSION,
        help="show the versions of vgpu-launch, Python, python-ptrace, python-prctl and "
        "structlog, and where vgpu-launch is installed; exit status 125 if one is missing",
    ),
)

# The settings by configuration key.
SETTINGS: dict[str, Option] = {o.name: o for o in OPTIONS if o.is_setting}
CONFIG_OPTION = next(o for o in OPTIONS if o.kind is Kind.CONFIG)
# Every VGPU_LAUNCH_ variable vgpu-launch reads.
KNOWN_VARS = frozenset(
    [*(o.env for o in OPTIONS if o.kind not in (Kind.VERSION, Kind.VERBOSE)), *OTHER_VARS]
)


# ---------------------------------------------------------------------------------------------
# values as written


def parse_assignment(text: str, where: str) -> tuple[str, str]:
    """``NAME=VALUE`` as given to --env/--force-env or in their variables."""
    name, eq, value = text.partition("=")
    if not eq or not _NAME.match(name):
        raise ConfigError(f"{where}: {text!r} is not NAME=VALUE (NAME: letters, digits, _)")
    return name, value


def is_variable_name(name: str) -> bool:
    return bool(_NAME.match(name))


# ---------------------------------------------------------------------------------------------
# the parsers


class Parser(argparse.ArgumentParser):
    """A parse error is a LaunchError (one line, exit status 2), not argparse's usage dump."""

    def error(self, message: str) -> NoReturn:
        raise LaunchError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


class SubcommandParser(Parser):
    """As Parser; the message names the subcommand, as nothing else prefixes it."""

    def error(self, message: str) -> NoReturn:
        raise LaunchError(f"{self.prog}: {message} (see {self.prog} --help)", EXIT_USAGE)


DESCRIPTION = """\
Start CMD with the preload libraries in LD_PRELOAD and keep them there: every program that
CMD's process tree executes with an environment lacking them (a runner started with a rebuilt
environment, `env -i`, Go's os/exec) gets them back before its first instruction, together
with the --env variables. Every exec is logged as a structured decision on stderr.
"""


def _file_key(opt: Option) -> str:
    """How the configuration file sets ``opt``, as an example."""
    value = opt.metavar or (opt.choices[0] if opt.choices else "")
    if opt.kind is Kind.PATHS:
        return f'{opt.name} = ["{value}", ...]'
    if opt.kind is Kind.ASSIGNMENTS:
        return f'[{opt.name}] NAME = "VALUE"'
    if opt.kind is Kind.BOOL:
        return f"{opt.name} = true"
    return f'{opt.name} = "{value}"'


def _settings_text() -> str:
    """Each setting's three spellings, one line each: --help lists the file's keys too."""
    rows = [("option", "environment variable", "configuration file")]
    rows += [(o.flag, o.env, _file_key(o)) for o in SETTINGS.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows)


def _subcommands_text() -> str:
    out = []
    for build in SUBCOMMANDS.values():
        sub = build()
        usage = " ".join(sub.format_usage().split()).removeprefix("usage: ")
        usage = usage.replace(" [-h]", "")
        summary = (sub.description or "").split(": ", 1)[0].split(". ", 1)[0]
        for text, first in ((usage, "  "), (summary, "      ")):
            out.append(
                textwrap.fill(
                    text,
                    width=94,
                    initial_indent=first,
                    subsequent_indent="      ",
                    break_on_hyphens=False,
                    break_long_words=False,
                )
            )
    return "\n".join(out)


def _epilog() -> str:
    return f"""\
subcommands:
{_subcommands_text()}

settings: each is an option, an environment variable and a key of the configuration file
(TOML; {CONFIG_OPTION.flag} PATH or {CONFIG_OPTION.env}, default {DEFAULT_CONFIG}). The
command line wins over the variable, the variable over the file. In a variable, paths are
separated by ':' or spaces, NAME=VALUE pairs by spaces, and booleans are 1/0 (or true/false).
{_settings_text()}

exit status:
  CMD's own exit status; if CMD is killed by a signal, vgpu-launch dies of the same signal
  (128+N when it is PID 1). 2: bad command line, configuration or preload library;
  125: vgpu-launch cannot run CMD here (ptrace refused, or a Python module it needs is
  missing: see --version); 126: CMD is not executable; 127: CMD not found.
"""


class _Version(argparse.Action):
    """--version: the versions this copy runs with (deps.version_report), like pip's."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        text, works = deps.version_report()
        if works:
            sys.stdout.write(text + "\n")
            parser.exit(0)
        parser.exit(EXIT_CANNOT_TRACE, text + "\n")


def _add(parser: argparse.ArgumentParser, opt: Option) -> None:
    if opt.kind is Kind.VERSION:
        parser.add_argument(opt.flag, action=_Version, help=opt.help)
    elif opt.kind is Kind.VERBOSE:
        parser.add_argument(*opt.flags, action="count", default=0, help=opt.help)
    elif opt.kind is Kind.BOOL:
        # default None: "not given", so that a lower source's value stands
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            action="store_false" if opt.negative else "store_true",
            default=None,
            help=opt.help,
        )
    elif opt.kind in (Kind.PATHS, Kind.GLOBS, Kind.ASSIGNMENTS):
        parser.add_argument(opt.flag, action="append", metavar=opt.metavar, help=opt.help)
    elif opt.kind is Kind.CHOICE:
        parser.add_argument(opt.flag, choices=opt.choices, help=opt.help)
    else:
        parser.add_argument(opt.flag, metavar=opt.metavar, help=opt.help)


def build_parser() -> Parser:
    """The parser of ``vgpu-launch [OPTIONS] -- CMD``: every Option, in OPTIONS' order."""
    p = Parser(
        prog=PROG,
        usage=f"{PROG} [OPTIONS] -- CMD [ARG...]",
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for opt in OPTIONS:
        _add(p, opt)
    return p


def _doctor_parser() -> SubcommandParser:
    p = SubcommandParser(
        prog=f"{PROG} doctor",
        description="Check everything that would make vgpu-launch or the preload library fail "
        "here: ptrace, each preload library, the configuration in effect, a systemd unit. "
        "One line per check: ok/note/warn/fail, what, why, how to fix. Exit status 0 only when "
        "nothing fails.",
    )
    p.add_argument(
        "--preload",
        action="append",
        metavar="PATH",
        help="library to check (repeatable; default: the configuration in effect)",
    )
    p.add_argument(
        "--unit",
        metavar="NAME",
        help="also check this systemd unit (its ExecStart, KillMode, NotifyAccess, "
        "drop-ins, hardening, User=, Environment=)",
    )
    p.add_argument("--config", metavar="PATH", help="configuration file to read")
    p.add_argument(
        "--check",
        action="append",
        metavar="PROGRAM",
        help="a program the service runs (a path, or a name looked up on PATH): its word size "
        "and linking; a library without a build for its word size is a warning, not a note "
        "(repeatable; the CMD of --unit's ExecStart is checked too)",
    )
    p.add_argument(
        "--show-values",
        action="store_true",
        help="show the values of --env, --force-env and [env] variables (default: names only, "
        "as they may be secrets)",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    return p


def _status_parser() -> SubcommandParser:
    p = SubcommandParser(
        prog=f"{PROG} status",
        description="Which processes really have the preload libraries mapped: one line per "
        "process of the tree under PID (default: every vgpu-launch process's tree; --unit: the "
        "unit's cgroup). Exit status 0 when every process has every library, 1 when one does "
        "not, 2 when there is nothing to look at.",
    )
    p.add_argument("pid", nargs="?", type=int, metavar="PID")
    p.add_argument("--unit", metavar="NAME", help="the processes of this systemd unit")
    p.add_argument(
        "--preload",
        action="append",
        metavar="PATH",
        help="library to look for (repeatable; default: the configuration, else "
        "what the vgpu-launch process found was given)",
    )
    p.add_argument("--config", metavar="PATH", help="configuration file to read")
    p.add_argument("--format", choices=("text", "json"), default="text")
    return p


def _release_parser() -> SubcommandParser:
    p = SubcommandParser(
        prog=f"{PROG} release",
        description="Give processes back from the vgpu-launch that traces them, so that a "
        "debugger (gdb -p, py-spy dump, strace -p) can attach. A released process keeps "
        "running with its preload, but programs it starts from then on are no longer "
        "followed: they keep the preload only through their environment. Only root and the "
        "user vgpu-launch runs as may release. Exit status: 0 every PID was released; 1 one "
        "was not (not traced by a vgpu-launch, refused, not reached); 2 bad usage or no such "
        "process.",
    )
    p.add_argument("pids", nargs="+", metavar="PID", help="a process of a vgpu-launch tree")
    p.add_argument(
        "--tree", action="store_true", help="also release every traced descendant of each PID"
    )
    return p


SUBCOMMANDS = {"doctor": _doctor_parser, "status": _status_parser, "release": _release_parser}


def subcommand_parser(name: str) -> SubcommandParser:
    """The parser of subcommand ``name`` ("doctor", "status", "release"; KeyError
    otherwise)."""
    return SUBCOMMANDS[name]()


# ---------------------------------------------------------------------------------------------
# the launcher's command line


def split_command(
    argv: Sequence[str], parser: argparse.ArgumentParser | None = None
) -> tuple[list[str], list[str]]:
    """Options before CMD, and CMD with its arguments: CMD starts after ``--`` or at the
    first argument that is neither an option nor an option's value. Which options take a
    value is read from the parser's actions."""
    parser = parser or build_parser()
    takes_value = {s for a in parser._actions if a.nargs != 0 for s in a.option_strings}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return list(argv[:i]), list(argv[i + 1 :])
        if not arg.startswith("-") or arg == "-":
            return list(argv[:i]), list(argv[i:])
        i += 2 if arg in takes_value else 1
    return list(argv), []


def cli_values(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, as ``config.load`` takes them (``cli``):
    only those given; --env/--force-env as {NAME: VALUE}."""
    values: dict[str, Any] = {}
    for opt in SETTINGS.values():
        v = getattr(ns, opt.name)
        if v is None:
            continue
        if opt.kind is Kind.ASSIGNMENTS:
            v = dict(parse_assignment(p, opt.flag) for p in v)
        values[opt.name] = v
    if ns.verbose:
        if ns.log_level is not None:
            raise LaunchError(
                "give -v or --log-level, not both (see vgpu-launch --help)", EXIT_USAGE
            )
        values["log_level"] = "info" if ns.verbose == 1 else "debug"
    return values


def parse_launcher(options: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """The launcher's options (before CMD): ``cli_values`` and --config. Bad options raise
    LaunchError."""
    ns = build_parser().parse_args(list(options))
    return cli_values(ns), ns.config


def parse_launcher_known(options: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """As parse_launcher, ignoring options it does not know (those of another version of
    vgpu-launch in a unit's ExecStart or a running process's command line)."""
    ns, _unknown = build_parser().parse_known_args(list(options))
    return cli_values(ns), ns.config
