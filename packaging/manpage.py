#!/usr/bin/env python3
"""Render the vgpu-launch(1) manual page from the command line parser.

The OPTIONS and COMMANDS sections are generated from
``vgpu_launch.cli.build_parser()``, so the manual lists exactly the options
the program accepts; the other sections (environment, files, exit status,
examples) are kept here, next to the generator, and are checked against the
source by tests/system/test_manpage.py.

Usage:  python3 packaging/manpage.py [--output FILE] [--date YYYY-MM-DD]

Run it with the source tree on the import path (the Debian and RPM builds
run it from the top of the tree).  The date defaults to SOURCE_DATE_EPOCH
when that is set, so package builds are reproducible.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

PROG = "vgpu-launch"

# What the environment variables and configuration keys mean.  The lists of
# names themselves come from vgpu_launch.config.KEYS where that exists, so a
# new key shows up in the manual even before it is described here.
ENV_TEXT: dict[str, str] = {
    "VGPU_LAUNCH_PRELOAD":
        "Libraries to preload, separated by colons or spaces; like \\fB\\-\\-preload\\fR.",
    "VGPU_LAUNCH_ENV":
        "NAME=VALUE assignments, separated by spaces, set where a program's environment "
        "lacks them; like \\fB\\-\\-env\\fR.",
    "VGPU_LAUNCH_FORCE_ENV":
        "NAME=VALUE assignments, separated by spaces, set even where a program's environment "
        "has a different value; like \\fB\\-\\-force\\-env\\fR.",
    "VGPU_LAUNCH_EXCLUDE":
        "Globs naming programs that are left as they are; like \\fB\\-\\-exclude\\fR.",
    "VGPU_LAUNCH_LOG_FORMAT": "\\fBjson\\fR or \\fBconsole\\fR; like \\fB\\-\\-log\\-format\\fR.",
    "VGPU_LAUNCH_LOG_LEVEL":
        "\\fBdebug\\fR, \\fBinfo\\fR, \\fBwarning\\fR or \\fBerror\\fR; like "
        "\\fB\\-\\-log\\-level\\fR.",
    "VGPU_LAUNCH_LOG_FILE": "A file the log is also appended to; like \\fB\\-\\-log\\-file\\fR.",
    "VGPU_LAUNCH_STRICT": "1 for \\fB\\-\\-strict\\fR, 0 to turn it off.",
    "VGPU_LAUNCH_NO_FOLLOW": "1 for \\fB\\-\\-no\\-follow\\fR, 0 to turn it off.",
    "VGPU_LAUNCH_ALLOW_INSECURE":
        "1 for \\fB\\-\\-allow\\-insecure\\fR, 0 to turn it off.",
    "VGPU_LAUNCH_CONFIG": "The configuration file to read instead of the default one.",
    "VGPU_LAUNCH_RELEASE_AFTER_EXEC":
        "Globs separated by semicolons (a glob may contain spaces); like "
        "\\fB\\-\\-release\\-after\\-exec\\fR.",
    "VGPU_LAUNCH_STRICT_ALLOW_RELEASE": "1 for \\fB\\-\\-strict\\-allow\\-release\\fR, 0 to "
                                        "turn it off.",
    "VGPU_LAUNCH_PTRACE_REQUESTS": "0 for \\fB\\-\\-no\\-ptrace\\-requests\\fR; 1 (the default) "
                                   "to hand the tree's ptrace requests over.",
}

CONFIG_TEXT: dict[str, str] = {
    "preload": "List of library paths; \\fB$LIB\\fR, \\fB$PLATFORM\\fR and \\fB$ORIGIN\\fR are "
               "left for the dynamic loader to expand.",
    "exclude": "List of globs: one starting with / is matched against a program's absolute "
               "path, any other against its base name.  Those programs are left as they are.",
    "strict": "Boolean.",
    "no_follow": "Boolean.",
    "allow_insecure": "Boolean.",
    "log_format": "\\fB\"json\"\\fR or \\fB\"console\"\\fR (default: console on a terminal, "
                  "json otherwise).",
    "log_level": "\\fB\"debug\"\\fR, \\fB\"info\"\\fR, \\fB\"warning\"\\fR or "
                 "\\fB\"error\"\\fR.",
    "log_file": "Path; \\fB\"\"\\fR for none.",
    "env": "Table of NAME = \"VALUE\" set where a program's environment lacks NAME.",
    "force_env": "Table of NAME = \"VALUE\" set even over a different value.",
    "release_after_exec": "List of globs, each matched against a program's resolved path "
                          "followed by its arguments (argv[1:]), joined by single spaces; "
                          "\\fB*\\fR matches any text, slashes and spaces included.  A "
                          "matching program is given back right after its exec.",
    "strict_allow_release": "Boolean.",
    "ptrace_requests": "Boolean (default true).",
}
TABLE_KEYS = ("env", "force_env")

# Subcommands that are dispatched before the main parser runs.  Where the
# program provides their parsers (vgpu_launch.diagnostics.commands.build_parser(NAME)),
# their options are rendered from them; otherwise this summary is shown.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("[\\fB\\-\\-preload\\fR \\fIPATH\\fR] [\\fB\\-\\-unit\\fR \\fINAME\\fR] "
               "[\\fB\\-\\-format\\fR \\fBjson\\fR]",
               "Check this host: whether ptrace is allowed, the preload libraries, the "
               "configuration and, with \\fB\\-\\-unit\\fR, a systemd unit."),
    "status": ("[\\fIPID\\fR | \\fB\\-\\-unit\\fR \\fINAME\\fR] "
               "[\\fB\\-\\-format\\fR \\fBjson\\fR]",
               "Show which processes of a tree (a process and its descendants, or a unit's "
               "processes) really have the preload libraries mapped."),
    "release": ("\\fIPID\\fR [\\fIPID\\fR...] [\\fB\\-\\-tree\\fR]",
                "Give processes back from the vgpu\\-launch that traces them, so that a "
                "debugger can attach."),
}

# Variables that are not settings (test hooks, internal hand-over).
UNDOCUMENTED_VARS = frozenset({"VGPU_LAUNCH_TEST_FAULT", "_VGPU_LAUNCH_SIGIGN"})


def config_keys() -> dict[str, str]:
    """Configuration key -> environment variable, from the program if it says."""
    try:
        from vgpu_launch import config
        keys = {k: v[1] for k, v in config.KEYS.items()}
    except (ImportError, AttributeError, TypeError, IndexError):
        keys = {k: "VGPU_LAUNCH_" + k.upper() for k in CONFIG_TEXT}
    return keys


def environment_vars() -> list[str]:
    names = list(config_keys().values())
    try:
        from vgpu_launch import config
        names += [n for n in getattr(config, "NON_OPTION_VARS", ()) if n in ENV_TEXT]
    except ImportError:
        pass
    names += [n for n in ENV_TEXT if n not in names]
    return [n for n in dict.fromkeys(names) if n not in UNDOCUMENTED_VARS]


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parsers of the subcommands, where vgpu_launch.diagnostics provides them:
    ``build_parser(NAME)``, or else ``_NAME_parser()``."""
    try:
        from vgpu_launch.diagnostics import commands as diagnostics
    except ImportError:
        return {}
    parsers = {}
    try:
        from vgpu_launch import control
        parsers["release"] = control.build_parser()
    except (ImportError, AttributeError):
        pass
    for name in COMMANDS:
        if name in parsers:
            continue
        build = getattr(diagnostics, "build_parser", None)
        try:
            if build is not None:
                parsers[name] = build(name)
            elif callable(getattr(diagnostics, f"_{name}_parser", None)):
                parsers[name] = getattr(diagnostics, f"_{name}_parser")()
        except (KeyError, ValueError, TypeError):
            continue
    return parsers


EXIT_STATUS: Sequence[tuple[str, str]] = (
    ("CMD's own", "When CMD exits, vgpu-launch exits with the same status.  When CMD is "
                  "killed by a signal, vgpu-launch kills itself with the same signal, so its "
                  "parent (a shell, systemd, a container runtime) sees what it would have "
                  "seen for CMD; as PID 1 of a PID namespace it exits with 128 + the signal "
                  "number instead."),
    ("2", "Usage or configuration error, or an unusable preload library."),
    ("125", "vgpu-launch cannot run CMD here (for example, ptrace is refused)."),
    ("126", "CMD was found but is not executable."),
    ("127", "CMD was not found."),
)


def roff_escape(text: str) -> str:
    """Escape plain text for use inside a roff line."""
    return text.replace("\\", "\\e")


def roff_text(text: str) -> str:
    """Escape plain text and protect lines that would be read as requests."""
    lines = []
    for line in roff_escape(text).splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def dashes(text: str) -> str:
    """Write the hyphens of an option name as roff minus signs."""
    return text.replace("-", "\\-")


def expand_help(action: argparse.Action, prog: str) -> str:
    """Expand %(default)s and friends as argparse does in its help output."""
    if not action.help:
        return ""
    params = dict(vars(action), prog=prog)
    for name in list(params):
        if params[name] is argparse.SUPPRESS:
            del params[name]
        elif hasattr(params[name], "__name__"):
            params[name] = params[name].__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    try:
        return str(action.help) % params
    except (KeyError, TypeError, ValueError):
        return str(action.help)


def metavar_text(action: argparse.Action) -> str:
    """The roff rendering of what an option takes, e.g. \\fIPATH\\fR."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        mv = action.metavar
        if isinstance(mv, tuple):
            return " ".join(f"\\fI{roff_escape(m)}\\fR" for m in mv)
        return f"\\fI{roff_escape(str(mv))}\\fR"
    if action.choices is not None:
        return "|".join(f"\\fB{roff_escape(str(c))}\\fR" for c in action.choices)
    return f"\\fI{roff_escape(action.dest.upper())}\\fR"


def option_entry(action: argparse.Action, prog: str) -> str:
    if action.option_strings:
        mv = metavar_text(action)
        names = [f"\\fB{dashes(s)}\\fR" + (" " + mv if mv else "") for s in action.option_strings]
        head = ", ".join(names)
    else:
        head = metavar_text(action) or f"\\fI{roff_escape(action.dest)}\\fR"
    body = roff_text(expand_help(action, prog)) or "\\&"
    return f".TP\n{head}\n{body}"


def subparser_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def visible_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions
        if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)
    ]


def usage_line(parser: argparse.ArgumentParser, name: str) -> str:
    """The usage of a (sub)parser with its program name in bold."""
    usage = " ".join(parser.format_usage().split())
    if usage.startswith("usage: "):
        usage = usage[len("usage: "):]
    prefix = parser.prog
    rest = usage[len(prefix):] if usage.startswith(prefix) else usage
    return f"\\fB{dashes(name)}\\fR{dashes(roff_escape(rest))}"


Command = tuple[str, str, str, "argparse.ArgumentParser | None"]


def iter_commands(
    parser: argparse.ArgumentParser,
) -> Iterable[tuple[str, str, argparse.ArgumentParser]]:
    for sp in subparser_actions(parser):
        helps = {ca.dest: (ca.help or "") for ca in sp._choices_actions}
        seen: set[int] = set()
        for name, sub in sp.choices.items():
            if id(sub) in seen:  # aliases
                continue
            seen.add(id(sub))
            yield name, helps.get(name) or (sub.description or ""), sub


def all_commands(parser: argparse.ArgumentParser) -> list[Command]:
    """(name, usage in roff, description in roff, parser or None) of each subcommand."""
    found: dict[str, Command] = {}
    sources = list(iter_commands(parser))
    sources += [(n, p.description or "", p) for n, p in command_parsers().items()]
    for name, help_text, sub in sources:
        if name in found:
            continue
        text = roff_text(help_text) if help_text else COMMANDS.get(name, ("", ""))[1]
        found[name] = (name, usage_line(sub, f"{PROG} {name}"), text, sub)
    for name, (usage, text) in COMMANDS.items():
        if name not in found:
            found[name] = (name, f"\\fB{dashes(PROG)} {dashes(name)}\\fR {usage}", text, None)
    return list(found.values())


def render(parser: argparse.ArgumentParser, *, version: str, date: str) -> str:
    out: list[str] = []
    w = out.append
    w(f'.TH VGPU\\-LAUNCH 1 "{date}" "vgpu\\-launch {version}" "User Commands"')
    w(".SH NAME")
    w("vgpu\\-launch \\- start a program so that a preload library reaches every process it spawns")
    w(".SH SYNOPSIS")
    w(".nh")
    w(".ad l")
    w(".B vgpu\\-launch")
    w("[\\fIOPTIONS\\fR] \\fB\\-\\-\\fR \\fICMD\\fR [\\fIARG\\fR...]")
    commands = all_commands(parser)
    for _name, usage, _text, _sub in commands:
        w(".br")
        w(usage)
    w(".ad")
    w(".hy")
    w(".SH DESCRIPTION")
    w(
        "\\fBvgpu\\-launch\\fR starts \\fICMD\\fR with \\fBLD_PRELOAD\\fR set to the configured "
        "libraries and follows the whole process tree that \\fICMD\\fR starts with "
        "\\fBptrace\\fR(2).  Whenever a process of the tree executes a program, "
        "\\fBvgpu\\-launch\\fR puts the preload back into its environment, so a program that "
        "removes \\fBLD_PRELOAD\\fR or builds its children's environment from scratch still "
        "starts them with the library.  Each decision is logged."
    )
    w(".PP")
    w(
        "\\fBvgpu\\-launch \\-\\- \\fICMD ARG\\fR... can be used wherever \\fICMD ARG\\fR... was: "
        "in a systemd unit's \\fBExecStart=\\fR, as a container's entry point, or in a shell.  "
        "Signals are forwarded to \\fICMD\\fR, the standard streams, working directory, limits "
        "and environment reach it unchanged (apart from the variables vgpu\\-launch is told to "
        "set), orphaned descendants are reaped, and \\fBvgpu\\-launch\\fR exits as \\fICMD\\fR "
        "did (see \\fBEXIT STATUS\\fR).  It writes nothing to standard output; its log goes to "
        "standard error as JSON lines, which systemd stores in the journal."
    )
    if parser.description:
        w(".PP")
        w(roff_text(parser.description))
    w(".SH OPTIONS")
    w("Options come before \\fB\\-\\-\\fR; everything after it is \\fICMD\\fR and its arguments.")
    for action in visible_actions(parser):
        w(option_entry(action, parser.prog))
    if commands:
        w(".SH COMMANDS")
        for name, usage, text, sub in commands:
            w(f".SS {dashes(PROG)} {dashes(name)}")
            w(usage)
            if text:
                w(".PP")
                w(text)
            if sub is not None:
                for action in visible_actions(sub):
                    w(option_entry(action, sub.prog))
    w(".SH ENVIRONMENT")
    w("A command line option overrides the variable, which overrides the configuration file.")
    keys = config_keys()
    key_of = {env: key for key, env in keys.items()}
    for name in environment_vars():
        text = ENV_TEXT.get(name) or f"Sets the configuration key \\fB{key_of.get(name, '?')}\\fR."
        w(f".TP\n\\fB{name}\\fR\n{text}")
    w(".SH FILES")
    w(".TP\n\\fI/etc/vgpu\\-launch/vgpu\\-launch.conf\\fR")
    w(
        "The configuration file, in TOML (read unless \\fB\\-\\-config\\fR or "
        "\\fBVGPU_LAUNCH_CONFIG\\fR names another).  Its keys:"
    )
    w(".RS")
    for key in dict.fromkeys([*keys, *CONFIG_TEXT]):
        label = f"[{key}]" if key in TABLE_KEYS else key
        text = CONFIG_TEXT.get(key, "See the option of the same name.")
        w(f".TP\n\\fB{label}\\fR\n{text}")
    w(".RE")
    w(".TP\n\\fI/usr/share/vgpu\\-launch/systemd/\\fR")
    w(
        "Drop-ins that wrap a service in \\fBvgpu\\-launch\\fR, for example "
        "\\fIollama.service.d/vgpu\\-launch.conf\\fR; they take effect only once linked or "
        "copied into \\fI/etc/systemd/system/\\fR (see \\fBEXAMPLES\\fR)."
    )
    w(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        w(f".TP\n\\fB{code}\\fR\n{text}")
    w(".SH EXAMPLES")
    w("Run a program with a library preloaded in every process it starts:")
    w(".PP\n.RS\n.nf")
    w("vgpu\\-launch \\-\\-preload /usr/lib/x86_64\\-linux\\-gnu/libvgpu.so \\e")
    w("    \\-\\- ./server \\-\\-port 8080")
    w(".fi\n.RE")
    w(".PP")
    w("Wrap the ollama service (installed by ollama's installer at /usr/local/bin/ollama):")
    w(".PP\n.RS\n.nf")
    w("mkdir \\-p /etc/systemd/system/ollama.service.d")
    w("ln \\-s /usr/share/vgpu\\-launch/systemd/ollama.service.d/vgpu\\-launch.conf \\e")
    w("      /etc/systemd/system/ollama.service.d/")
    w("systemctl daemon\\-reload && systemctl restart ollama")
    w(".fi\n.RE")
    w(".PP")
    w("Any other service: a drop-in (\\fBsystemctl edit\\fR \\fIUNIT\\fR) with")
    w(".PP\n.RS\n.nf")
    w("[Service]")
    w("ExecStart=")
    w("ExecStart=/usr/bin/vgpu\\-launch \\-\\- \\fIthe unit's own command line\\fR")
    w("KillMode=mixed")
    w(".fi\n.RE")
    w(".PP")
    w("A container image:")
    w(".PP\n.RS\n.nf")
    w('ENTRYPOINT ["vgpu\\-launch", "\\-\\-", "/usr/bin/server"]')
    w(".fi\n.RE")
    w(".SH NOTES")
    w(
        "A unit that runs \\fBvgpu\\-launch\\fR should set \\fBKillMode=mixed\\fR: "
        "\\fBsystemctl stop\\fR then sends SIGTERM only to \\fBvgpu\\-launch\\fR, which forwards "
        "it once to \\fICMD\\fR (with the default \\fBKillMode=control\\-group\\fR \\fICMD\\fR "
        "would receive it twice), and SIGKILL to whatever is left at the end.  A "
        "\\fBType=notify\\fR unit needs \\fBNotifyAccess=all\\fR, because the readiness "
        "notification comes from \\fICMD\\fR, not from the main process."
    )
    w(".PP")
    w(
        "The configuration file and the preload libraries must not be writable by users other "
        "than root or the file's owner; \\fBvgpu\\-launch\\fR refuses them otherwise (see "
        "\\fB\\-\\-allow\\-insecure\\fR)."
    )
    w(".PP")
    w(
        "Tracing its own descendants needs no extra capability on current kernels.  Where a "
        "container runtime's seccomp profile refuses \\fBptrace\\fR(2), use "
        "\\fB\\-\\-no\\-follow\\fR "
        "(the preload then reaches only the processes that keep \\fBLD_PRELOAD\\fR) or a "
        "profile that allows \\fBptrace\\fR."
    )
    w(".PP")
    w(
        "A process has one tracer, and under \\fBvgpu\\-launch\\fR that is "
        "\\fBvgpu\\-launch\\fR.  To attach \\fBgdb \\-p\\fR, \\fBpy\\-spy dump\\fR or "
        "\\fBstrace \\-p\\fR to a process of the tree, give it back first with "
        "\\fBvgpu\\-launch release\\fR \\fIPID\\fR: it keeps running with its preload, but "
        "the programs it starts from then on are no longer followed.  A process of the tree "
        "that asks for \\fBptrace\\fR(2) itself (\\fBstrace\\fR or \\fBgdb\\fR run by the "
        "tree, LeakSanitizer) is given back the same way, automatically, when "
        "\\fBvgpu\\-launch\\fR runs as root or with no_new_privs set; once "
        "\\fBvgpu\\-launch\\fR has exited, those requests fail with ENOSYS in what is left of "
        "the tree."
    )
    w(".SH SEE ALSO")
    w("\\fBld.so\\fR(8), \\fBptrace\\fR(2), \\fBsystemd.service\\fR(5), \\fBsystemd.kill\\fR(5), "
      "\\fBsystemctl\\fR(1)")
    return "\n".join(out) + "\n"


def build_date(explicit: str | None) -> str:
    if explicit:
        return explicit
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)
        if epoch
        else datetime.datetime.now(tz=datetime.timezone.utc)
    )
    return when.strftime("%Y-%m-%d")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render vgpu-launch(1) from the CLI parser.")
    ap.add_argument("--output", "-o", type=Path, help="write here instead of standard output")
    ap.add_argument("--date", help="date shown in the page footer (YYYY-MM-DD)")
    args = ap.parse_args(argv)

    import vgpu_launch
    from vgpu_launch.cli import build_parser

    page = render(build_parser(), version=vgpu_launch.__version__, date=build_date(args.date))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
