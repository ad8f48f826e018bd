#!/usr/bin/env python3
"""Render the vgpu-launch(1) manual page from the command line parser.

The OPTIONS and COMMANDS sections are generated from the option schema,
``vgpu_launch.options`` (``build_parser()`` and ``subcommand_parser(NAME)``),
so the manual lists exactly the options the program accepts; the other
sections (environment, files, exit status, examples) are kept here, next to
the generator, and are checked against the source by
tests/system/test_manpage.py.

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
# names themselves come from vgpu_launch.options.SETTINGS, so a new key shows
# up in the manual even before it is described here.
ENV_TEXT: dict[str, str] = {
    "VGPU_LAUNCH_PRELOAD": "Libraries to preload, separated by colons or spaces; like "
    "\\fB\\-\\-preload\\fR.",
    "VGPU_LAUNCH_ENV": "NAME=VALUE assignments, separated by spaces, set where a program's "
    "environment "
    "lacks them; like \\fB\\-\\-env\\fR.",
    "VGPU_LAUNCH_FORCE_ENV": "NAME=VALUE assignments, separated by spaces, set even where a "
    "program's environment "
    "has a different value; like \\fB\\-\\-force\\-env\\fR.",
    "VGPU_LAUNCH_EXCLUDE": "Globs naming programs that are left as they are; like "
    "\\fB\\-\\-exclude\\fR.",
    "VGPU_LAUNCH_LOG_FORMAT": "\\fBjson\\fR or \\fBconsole\\fR; like \\fB\\-\\-log\\-format\\fR.",
    "VGPU_LAUNCH_LOG_LEVEL": "\\fBdebug\\fR, \\fBinfo\\fR, \\fBwarning\\fR or \\fBerror\\fR; like "
    "\\fB\\-\\-log\\-level\\fR.",
    "VGPU_LAUNCH_LOG_FILE": "A file the log is also appended to; like \\fB\\-\\-log\\-file\\fR.",
    "VGPU_LAUNCH_STRICT": "1 for \\fB\\-\\-strict\\fR, 0 to turn it off.",
    "VGPU_LAUNCH_NO_FOLLOW": "1 for \\fB\\-\\-no\\-follow\\fR, 0 to turn it off.",
    "VGPU_LAUNCH_ALLOW_INSECURE": "1 for \\fB\\-\\-allow\\-insecure\\fR, 0 to turn it off.",
    "VGPU_LAUNCH_CONFIG": "The configuration file to read instead of the default one.",
    "VGPU_LAUNCH_PYTHON": "The Python interpreter that \\fI/usr/bin/vgpu\\-launch\\fR runs "
    "(default: "
    "\\fI/usr/bin/python3\\fR, whatever \\fBPATH\\fR says); it needs python\\-ptrace, "
    "python\\-prctl and structlog.  Not a setting: it is not read from the configuration "
    "file, and \\fICMD\\fR inherits it like any other variable.",
    "VGPU_LAUNCH_RELEASE_AFTER_EXEC": "Globs separated by semicolons (a glob may contain spaces); "
    "like "
    "\\fB\\-\\-release\\-after\\-exec\\fR.",
    "VGPU_LAUNCH_STRICT_ALLOW_RELEASE": "1 for \\fB\\-\\-strict\\-allow\\-release\\fR, 0 to "
    "turn it off.",
    "VGPU_LAUNCH_PTRACE_REQUESTS": "0 for \\fB\\-\\-no\\-ptrace\\-requests\\fR; 1 (the default) "
    "to hand the tree's ptrace requests over.",
}

# Variables of the environment vgpu-launch is started with that are not its own settings.
OTHER_ENV_TEXT: Sequence[tuple[str, str]] = (
    (
        "LD_PRELOAD",
        "Kept: \\fICMD\\fR gets the configured libraries first, then the entries the variable "
        "already had, each once.",
    ),
)

CONFIG_TEXT: dict[str, str] = {
    "preload": "List of library paths; \\fB$LIB\\fR, \\fB$PLATFORM\\fR and \\fB$ORIGIN\\fR are "
    "left for the dynamic loader to expand.",
    "exclude": "List of globs: one starting with / is matched against a program's absolute "
    "path, any other against its base name.  Those programs are left as they are.",
    "strict": "Boolean.",
    "no_follow": "Boolean.",
    "allow_insecure": "Boolean.",
    "log_format": '\\fB"json"\\fR or \\fB"console"\\fR (default: console on a terminal, '
    "json otherwise).",
    "log_level": '\\fB"debug"\\fR, \\fB"info"\\fR, \\fB"warning"\\fR or \\fB"error"\\fR.',
    "log_file": 'Path; \\fB""\\fR for none.',
    "env": 'Table of NAME = "VALUE" set where a program\'s environment lacks NAME.',
    "force_env": 'Table of NAME = "VALUE" set even over a different value.',
    "release_after_exec": "List of globs, each matched against a program's resolved path "
    "followed by its arguments (argv[1:]), joined by single spaces; "
    "\\fB*\\fR matches any text, slashes and spaces included.  A "
    "matching program is given back right after its exec.",
    "strict_allow_release": "Boolean.",
    "ptrace_requests": "Boolean (default true).",
}
TABLE_KEYS = ("env", "force_env")

# Subcommands that are dispatched before the main parser runs.  Their options
# are rendered from vgpu_launch.options.subcommand_parser(NAME); this summary
# is shown only for one the program does not provide a parser for.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": (
        "[\\fB\\-\\-preload\\fR \\fIPATH\\fR] [\\fB\\-\\-unit\\fR \\fINAME\\fR] "
        "[\\fB\\-\\-format\\fR \\fBjson\\fR]",
        "Check this host: whether ptrace is allowed, the preload libraries, the "
        "configuration and, with \\fB\\-\\-unit\\fR, a systemd unit.",
    ),
    "status": (
        "[\\fIPID\\fR | \\fB\\-\\-unit\\fR \\fINAME\\fR] [\\fB\\-\\-format\\fR \\fBjson\\fR]",
        "Show which processes of a tree (a process and its descendants, or a unit's "
        "processes) really have the preload libraries mapped.",
    ),
    "release": (
        "\\fIPID\\fR [\\fIPID\\fR...] [\\fB\\-\\-tree\\fR]",
        "Give processes back from the vgpu\\-launch that traces them, so that a "
        "debugger can attach.",
    ),
}

# Variables that are not settings (test hooks, internal hand-over).
UNDOCUMENTED_VARS = frozenset({"VGPU_LAUNCH_TEST_FAULT", "_VGPU_LAUNCH_SIGIGN"})


def config_keys() -> dict[str, str]:
    """Configuration key -> environment variable, from the option schema."""
    from vgpu_launch import options

    return {key: opt.env for key, opt in options.SETTINGS.items()}


def environment_vars() -> list[str]:
    """The settings' variables, then the other options' (VGPU_LAUNCH_CONFIG), then any other
    variable described here."""
    from vgpu_launch import options

    names = list(config_keys().values())
    names += [o.env for o in options.OPTIONS if not o.is_setting and o.env in ENV_TEXT]
    names += [n for n in ENV_TEXT if n not in names]
    return [n for n in dict.fromkeys(names) if n not in UNDOCUMENTED_VARS]


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parsers of the subcommands, from the option schema."""
    from vgpu_launch import options

    return {name: options.subcommand_parser(name) for name in options.SUBCOMMANDS}


EXIT_STATUS: Sequence[tuple[str, str]] = (
    (
        "CMD's own",
        "When CMD exits, vgpu-launch exits with the same status.  When CMD is "
        "killed by a signal, vgpu-launch kills itself with the same signal, so its "
        "parent (a shell, systemd, a container runtime) sees what it would have "
        "seen for CMD; as PID 1 of a PID namespace it exits with 128 + the signal "
        "number instead.",
    ),
    (
        "1",
        "From \\fBdoctor\\fR: a check failed; from \\fBstatus\\fR: a process lacks a "
        "library.  (A run exits 1 only when \\fICMD\\fR did.)",
    ),
    ("2", "Usage or configuration error, or an unusable preload library."),
    (
        "125",
        "vgpu-launch cannot run CMD here: ptrace is refused (\\fBcannot trace\\fR; see "
        "\\fBTROUBLESHOOTING\\fR), or the Python interpreter lacks python\\-ptrace, "
        "python\\-prctl or structlog (one line names what is missing and the commands that "
        "install it; \\fB\\-\\-version\\fR and \\fBdoctor\\fR exit so too).",
    ),
    ("126", "CMD was found but is not executable."),
    ("127", "CMD was not found."),
)


# The decision log (docs/configuration.md, "The decision log", says the same in Markdown;
# tests/system/test_manpage.py checks that every event there is here).
EVENTS: Sequence[tuple[str, str, str]] = (
    (
        "start",
        "info",
        "Once, first: \\fBversion\\fR, \\fBpid\\fR, \\fBcmd\\fR, \\fBexecutable\\fR, "
        "\\fBfollow\\fR, the configuration in effect (\\fBpreload\\fR, \\fBenv\\fR, "
        "\\fBforce_env\\fR, \\fBexclude\\fR, \\fBstrict\\fR, \\fBno_follow\\fR, "
        "\\fBconfig_file\\fR; of \\fBenv\\fR and \\fBforce_env\\fR the names only: values are "
        "often secrets), \\fBsources\\fR (where each value came from), "
        "\\fBpreload_word_sizes\\fR and, where they apply, \\fBnotes\\fR (paths accepted because "
        "their owner is outside this user namespace) and \\fBinsecure_accepted\\fR.",
    ),
    (
        "exec",
        "info; warning when failed or lost; debug when gone",
        "At every exec in the tree: \\fBpid\\fR, \\fBppid\\fR, \\fBexe\\fR "
        "(\\fI/proc/PID/exe\\fR), "
        "\\fBargv\\fR (the first 16), \\fBpreload_before\\fR (the \\fBLD_PRELOAD\\fR the program "
        "was executed with), \\fBdecision\\fR, \\fBpreload_after\\fR (the one it runs with), "
        "\\fBstatic\\fR, \\fBbits\\fR, \\fBelapsed_us\\fR and, where they apply, \\fBenv_set\\fR "
        "(the variables put back), \\fBformer_tid\\fR, \\fBnote\\fR (for example a 32\\-bit "
        "program "
        "without a 32\\-bit build of the library), \\fBreason\\fR, \\fBlost\\fR (the setuid "
        "identity or file capabilities a program did not get because vgpu\\-launch lacks "
        "CAP_SYS_PTRACE) and \\fBaction\\fR.",
    ),
    (
        "verify",
        "info, warning or debug",
        "Shortly after each injected, merged or present exec, whether the libraries really got "
        "mapped (\\fI/proc/PID/maps\\fR): \\fBresult\\fR (verified, at info; unverified, at "
        "warning; exited, at debug: the program ended before it could be looked at), "
        "\\fBmapped\\fR "
        "or \\fBmissing\\fR, \\fBbits\\fR, \\fBreason\\fR, \\fBafter_ms\\fR.",
    ),
    (
        "fork, vfork, clone, exit",
        "debug",
        "Every process and thread created or ended: \\fBpid\\fR, \\fBparent\\fR, \\fBstatus\\fR.",
    ),
    ("no\\-follow", "warning", "With \\fB\\-\\-no\\-follow\\fR: \\fICMD\\fR runs untraced."),
    (
        "signal",
        "debug; warning when it could not be forwarded",
        "Every signal that reached vgpu\\-launch: \\fBsignal\\fR, \\fBcode\\fR, \\fBsender\\fR, "
        "\\fBaction\\fR (forwarded, or why not).",
    ),
    (
        "cmd\\-took",
        "debug",
        "\\fICMD\\fR took a signal from another process: \\fBsignal\\fR, \\fBtid\\fR, "
        "\\fBsender\\fR, \\fBgroup_kill\\fR (sent to the whole process group, so not forwarded "
        "again).",
    ),
    (
        "verify\\-failed",
        "error",
        "An internal error while verifying: \\fBerror\\fR; later programs are still verified.",
    ),
    (
        "test\\-hook\\-ignored",
        "warning",
        "\\fBVGPU_LAUNCH_TEST_FAULT\\fR is set outside the test suite: it changes nothing else.",
    ),
    (
        "log\\-dropped",
        "warning",
        "A reader of the log was too slow and events were dropped rather than stopping the "
        "service: \\fBdropped\\fR (how many), \\fBsink\\fR (stderr, journal or file).",
    ),
    (
        "ptrace\\-requests",
        "info",
        "Once, at start: \\fBhandled\\fR, whether the tree's own \\fBptrace\\fR(2) requests "
        "are handed over (a process of the tree that asks to trace another is given it); if "
        "not, \\fBreason\\fR.",
    ),
    (
        "released",
        "info; warning in strict mode",
        "A process was given back: \\fBpid\\fR, \\fBexe\\fR, \\fBreason\\fR (request, "
        "ptrace\\-traceme, ptrace\\-attach, ptrace\\-seize, release_after_exec), \\fBby\\fR "
        "(who asked), \\fBthreads\\fR, \\fBstops\\fR, \\fBstays_stopped\\fR, and "
        "\\fBchildren\\fR: programs it starts are no longer followed.",
    ),
    (
        "release\\-refused",
        "warning; error in strict mode",
        "A release asked by another user, or anything to release in strict mode without "
        "\\fB\\-\\-strict\\-allow\\-release\\fR: \\fBpid\\fR or \\fBpids\\fR, "
        "\\fBby\\fR, \\fBreason\\fR.",
    ),
    (
        "release\\-channel",
        "warning",
        "At start, when the socket of \\fBvgpu\\-launch release\\fR cannot listen: \\fBerror\\fR.",
    ),
    (
        "release\\-request\\-failed, ptrace\\-request\\-failed, ptrace\\-requests\\-stopped",
        "warning or error",
        "An internal error while serving a request: \\fBtraceback\\fR; the request proceeds "
        "untouched.",
    ),
    (
        "internal\\-error",
        "error",
        "An internal error in the main thread (one signal, or sigwaitinfo): \\fBerror\\fR, "
        "\\fBtraceback\\fR; vgpu\\-launch goes on supervising \\fICMD\\fR.",
    ),
    (
        "tracer\\-failed",
        "error",
        "An internal error of the tracer: \\fBerror\\fR, \\fBtraceback\\fR.  The tree runs on "
        "untraced (in strict mode it is killed).",
    ),
    (
        "end",
        "info",
        "Once, when \\fICMD\\fR has exited: \\fBcounts\\fR per decision, \\fBspawned\\fR, "
        "\\fBtracees_left\\fR, \\fBseconds\\fR, \\fBcmd_exit\\fR or \\fBcmd_signal\\fR, "
        "\\fBcpu_seconds\\fR, \\fBmax_rss_kb\\fR, \\fBverification\\fR (verified, unverified, "
        "exited, skipped), \\fBtracer_failed\\fR after a tracer failure, and \\fBlog_dropped\\fR "
        "and \\fBlog_errors\\fR (events this sink lost or could not write).",
    ),
)

DECISIONS: Sequence[tuple[str, str]] = (
    ("injected", "The program had no \\fBLD_PRELOAD\\fR; it now has the configured one."),
    ("merged", "It had one without (all of) the configured libraries: they were merged into it."),
    ("present", "It already had every configured library: nothing written."),
    ("excluded", "It matched \\fB\\-\\-exclude\\fR: left exactly as it is."),
    (
        "setuid",
        "It runs with \\fBAT_SECURE\\fR (setuid, setgid, file capabilities), where "
        "ld.so ignores the preload: left alone.",
    ),
    ("gone", "It was killed while its exec was handled: nothing runs, logged at debug."),
    (
        "failed",
        "Its memory could not be read or written (\\fBreason\\fR says why): it runs "
        "without the preload, or is killed in strict mode (\\fBaction\\fR).",
    ),
)

# Symptom, then what to do: enough to operate it from this page alone.
TROUBLESHOOTING: Sequence[tuple[str, str]] = (
    (
        "Python modules ... missing (exit status 125)",
        "The interpreter vgpu\\-launch runs lacks its libraries.  For \\fI/usr/bin/python3\\fR "
        "install the distribution's packages (Debian: \\fBapt\\-get install python3\\-ptrace "
        "python3\\-prctl python3\\-structlog\\fR), for another interpreter use its own "
        "\\fBpip\\fR as the line says, or point \\fBVGPU_LAUNCH_PYTHON\\fR at an interpreter "
        "that has them.",
    ),
    (
        "cannot trace CMD ... (exit status 125)",
        "ptrace is refused.  \\fBvgpu\\-launch doctor\\fR (in the container, or with "
        "\\fB\\-\\-unit\\fR \\fINAME\\fR for a service) really traces a child and names the "
        "cause: a seccomp profile without \\fBptrace\\fR (allow it), Yama's "
        "\\fBkernel.yama.ptrace_scope\\fR 2 (needs \\fBCAP_SYS_PTRACE\\fR) or 3, another tracer "
        "such as \\fBstrace \\-f\\fR, a unit's \\fBSystemCallFilter=\\fR without "
        "\\fBptrace\\fR (add \\fBSystemCallFilter=ptrace\\fR in a drop\\-in).  Where ptrace "
        "cannot be allowed, \\fB\\-\\-no\\-follow\\fR sets the variables for \\fICMD\\fR only.",
    ),
    (
        "The service's helper processes (ollama's runners) find no GPU",
        "\\fBvgpu\\-launch doctor \\-\\-unit\\fR \\fIUNIT\\fR checks the set\\-up: the "
        "drop\\-in in effect, \\fBKillMode\\fR, \\fBNotifyAccess\\fR, the library readable by "
        "the unit's \\fBUser=\\fR and not hidden by \\fBPrivateTmp=\\fR or "
        "\\fBProtectHome=\\fR.  Then the log (\\fBLOG\\fR): each helper needs an \\fBexec\\fR "
        "event with decision injected, merged or present, and no \\fBverify\\fR warning.  "
        "\\fBvgpu\\-launch status \\-\\-unit\\fR \\fIUNIT\\fR shows which running processes "
        "have the library mapped.  If all have it, look at the shim and the driver.",
    ),
    (
        "A verify warning: injected, but not loaded",
        "Its \\fBreason\\fR says why ld.so did not load the library: a 32\\-bit program and a "
        "64\\-bit library (name a build per word size with \\fB$LIB\\fR in the path), no file "
        "at the \\fB$LIB\\fR expansion, a static program (its children still get the preload), "
        "or ld.so's own refusal, whose message is on the program's standard error.",
    ),
    (
        "/proc/PID/environ does not show LD_PRELOAD",
        "Expected: the variable is put in at the exec, after the kernel made the area that file "
        "shows.  \\fI/proc/PID/maps\\fR (\\fBvgpu\\-launch status\\fR \\fIPID\\fR) says "
        "whether the library is loaded.",
    ),
    (
        "Some processes of the unit are marked escaped",
        "They were not started from vgpu\\-launch's tree: \\fBExecStartPre=\\fR, "
        "\\fBExecReload=\\fR, \\fBExecStop=\\fR commands, processes moved into the cgroup, "
        "\\fBdocker exec\\fR.  Put vgpu\\-launch in front of them too.",
    ),
    (
        "refusing preload library ...: writable by ... (exit status 2)",
        "Users other than root or the file's owner can change the library, the configuration file "
        "or a directory above it.  \\fBchown root:\\fR and \\fBchmod go\\-w\\fR them as the "
        "message says, or accept the risk with \\fB\\-\\-allow\\-insecure\\fR.",
    ),
    (
        "A Type=notify service never becomes active",
        "Its readiness notification comes from \\fICMD\\fR, not from the main process: add "
        "\\fBNotifyAccess=all\\fR to the drop\\-in.",
    ),
)

DOC_DIR = "/usr/share/doc/vgpu-launch"
DOCS: Sequence[tuple[str, str]] = (
    ("docs/install.md", "packages, enabling it for ollama or any service, containers"),
    ("docs/configuration.md", "every setting, the configuration file, the decision log"),
    ("docs/troubleshooting.md", "doctor, status, reading the log, each symptom in detail"),
    ("docs/launcher.md", "exit status, signals, job control, reaping"),
    ("docs/security.md", "file permission checks, setuid programs"),
    ("docs/strict-mode.md", "what --strict guarantees and what it cannot"),
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
        a
        for a in parser._actions
        if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)
    ]


def usage_line(parser: argparse.ArgumentParser, name: str) -> str:
    """The usage of a (sub)parser with its program name in bold."""
    usage = " ".join(parser.format_usage().split())
    if usage.startswith("usage: "):
        usage = usage[len("usage: ") :]
    prefix = parser.prog
    rest = usage[len(prefix) :] if usage.startswith(prefix) else usage
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
    # no hyphenation anywhere: the page is full of names, paths and options to be typed
    w(".nh")
    w(".SH NAME")
    w("vgpu\\-launch \\- start a program so that a preload library reaches every process it spawns")
    w(".SH SYNOPSIS")
    w(".ad l")
    w(".B vgpu\\-launch")
    w("[\\fIOPTIONS\\fR] \\fB\\-\\-\\fR \\fICMD\\fR [\\fIARG\\fR...]")
    commands = all_commands(parser)
    for _name, usage, _text, _sub in commands:
        w(".br")
        w(usage)
    w(".ad")
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
        "did (see \\fBEXIT STATUS\\fR).  It writes nothing to standard output; its decision "
        "log goes to standard error, under systemd to the journal (see \\fBLOG\\fR)."
    )
    # The parser's description (the summary of --help) is not repeated here: it says what the
    # first paragraph above says.
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
    for name, text in OTHER_ENV_TEXT:
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
    w(
        ".TP\n\\fI/lib/systemd/system/vgpu\\-launch@.service\\fR, "
        "\\fI/etc/vgpu\\-launch/\\fINAME\\fI.env\\fR"
    )
    w(
        "A template unit for a command without a unit of its own: "
        "\\fBsystemctl enable \\-\\-now vgpu\\-launch@\\fINAME\\fR runs the "
        "\\fBCOMMAND=\\fR of \\fI/etc/vgpu\\-launch/\\fINAME\\fI.env\\fR (an example is in "
        f"\\fI{dashes(DOC_DIR)}/examples/\\fR)."
    )
    w(f".TP\n\\fI{dashes(DOC_DIR)}/\\fR")
    w("The full documentation, in Markdown, uncompressed: \\fIREADME.md\\fR and")
    w(".RS")
    for path, what in DOCS:
        w(f".TP\n\\fI{dashes(path)}\\fR\n{roff_text(what).replace('-', chr(92) + '-')}")
    w(".RE")
    w(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        w(f".TP\n\\fB{code}\\fR\n{text}")
    w(".SH LOG")
    w(
        "One event per line on standard error: a JSON object when standard error is not a "
        "terminal (under systemd it is stored in the journal as the message text) or with "
        "\\fB\\-\\-log\\-format json\\fR, a readable line on a terminal.  "
        "\\fB\\-\\-log\\-file\\fR also appends the JSON lines to a file.  Every event has "
        "\\fBevent\\fR, \\fBlevel\\fR and \\fBts\\fR (UTC); \\fB\\-\\-log\\-level\\fR "
        "drops those below it.  The events and their fields:"
    )
    for name, level, fields in EVENTS:
        w(f".TP\n\\fB{name}\\fR ({level})\n{fields}")
    w(".PP")
    w("The \\fBdecision\\fR of an \\fBexec\\fR event:")
    for name, text in DECISIONS:
        w(f".TP\n\\fB{name}\\fR\n{text}")
    w(".PP")
    w(
        "\\fBstatic\\fR true means the program has no ELF interpreter: the preload cannot load "
        "into it, but the variable is kept for its children.  \\fI/proc/PID/environ\\fR of "
        "an injected program does not show the variable (see \\fBTROUBLESHOOTING\\fR)."
    )
    w(".PP")
    w(
        "A service's own standard error lands in the same journal, so read each line as text and "
        "keep the JSON ones (\\fBjq \\-R \\(aqfromjson?\\(aq\\fR); without it \\fBjq\\fR "
        "stops at the first line that is not JSON:"
    )
    w(".PP\n.RS\n.nf")
    w("journalctl \\-o cat \\-u ollama \\-\\-since \\-1h \\e")
    w('  | jq \\-cR \\(aqfromjson? | select(.event=="exec") | {pid, exe, decision, note}\\(aq')
    w("journalctl \\-o cat \\-u ollama \\e")
    w('  | jq \\-cR \\(aqfromjson? | select(.level=="warning" or .level=="error")\\(aq')
    w(".fi\n.RE")
    w(".SH TROUBLESHOOTING")
    w(
        "\\fBvgpu\\-launch doctor\\fR checks a host (and with \\fB\\-\\-unit\\fR a "
        "service) before anything runs; \\fBvgpu\\-launch status\\fR shows which processes "
        "of a running tree have the library mapped; the log says what was decided at each exec."
    )
    for symptom, what in TROUBLESHOOTING:
        w(f".TP\n\\fB{symptom}\\fR\n{what}")
    w(".PP")
    w(f"Each case in detail: \\fI{dashes(DOC_DIR)}/docs/troubleshooting.md\\fR.")
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
    w(
        "\\fBld.so\\fR(8), \\fBptrace\\fR(2), \\fBsystemd.service\\fR(5), \\fBsystemd.kill\\fR(5), "
        "\\fBsystemd.exec\\fR(5), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBjq\\fR(1)"
    )
    w(".PP")
    w(
        f"\\fI{dashes(DOC_DIR)}/README.md\\fR and \\fI{dashes(DOC_DIR)}/docs/\\fR (see "
        "\\fBFILES\\fR)."
    )
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
    from vgpu_launch.options import build_parser

    page = render(build_parser(), version=vgpu_launch.__version__, date=build_date(args.date))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
