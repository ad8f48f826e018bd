"""Every jq command the documentation gives for reading the journal works on a real journal:
one that also holds the service's own lines, which are not vgpu-launch's JSON events."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess

import pytest
from support import REPO, launch
from support.build import Programs

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# What a service writes to the same journal besides vgpu-launch's events (journalctl -o cat).
SERVICE_LINES = [
    'time=2026-01-01T00:00:00Z level=INFO source=server.go:1 msg="Listening on 127.0.0.1"',
    "",
    "42",
    "null",
    '"a quoted string"',
    "[1, 2, 3]",
    '{"msg": "the service\'s own JSON", "level": "INFO", "pid": 4301}',
    '{"event":"exec", "truncated by the journal',
    "panic: runtime error: index out of range [3] with length 3",
    "\tgoroutine 1 [running]:",
]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every documented pipeline from journalctl into jq."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            command = ""
            for line in block.splitlines():
                if not command and line.lstrip().startswith("#"):
                    continue  # a comment
                command = f"{command} {line.strip()}" if command else line.strip()
                if command.endswith("\\"):
                    command = command[:-1].rstrip()
                    continue
                if command.count("'") % 2:  # a quoted jq program goes on
                    continue
                found.append((doc.name, command))
                command = ""
        # inline `...` spans in the prose
        found += [(doc.name, span) for span in re.findall(r"`([^`\n]*)`", text)]
    commands: list[tuple[str, str]] = []
    for where, command in found:
        # a continuation line that starts the pipe: "journalctl ... \ | jq ..."
        command = re.sub(r"\s+\|\s*", " | ", command)
        if "journalctl" in command and "| jq" in command and (where, command) not in commands:
            commands.append((where, command))
    return commands


COMMANDS = documented_commands()


def test_the_docs_give_jq_commands() -> None:
    """The extraction finds the documented commands (README and troubleshooting.md at least)."""
    assert {where for where, _ in COMMANDS} >= {"README.md", "troubleshooting.md"}
    assert len(COMMANDS) >= 10, COMMANDS


@pytest.fixture(scope="module")
def journal(programs: Programs) -> bytes:
    """journalctl -o cat of a service: vgpu-launch's events from a real run, with the
    service's own lines between them, plus the events the documented examples look for."""
    script = "; ".join(f"printf '%s\\n' {shlex.quote(line)} >&2" for line in SERVICE_LINES)
    # A real run, so that the documented commands meet the fields vgpu-launch really writes
    # (to stderr: without JOURNAL_STREAM it does not look for the journal).
    res = launch.run(
        ["--preload", programs.libquiet, "--", "sh", "-c", f"{script}; env -i /bin/true"],
        env={"JOURNAL_STREAM": None},
    )
    assert res.returncode == 0, res.describe()
    own = [
        {
            "event": "exec",
            "level": "warning",
            "ts": "2026-01-01T00:00:01.000000Z",
            "pid": 4301,
            "ppid": 4300,
            "exe": "/usr/local/bin/ollama",
            "argv": ["ollama", "runner"],
            "decision": "failed",
            "reason": "OSError: ...",
            "action": "runs without the preload",
            "bits": 64,
            "static": False,
        },
        {
            "event": "verify",
            "level": "warning",
            "ts": "2026-01-01T00:00:02.000000Z",
            "pid": 4301,
            "exe": "/usr/local/bin/ollama",
            "result": "unverified",
            "bits": 64,
            "reason": "not mapped",
        },
    ]
    lines = res.stderr.encode().splitlines()
    names = set()
    for line in lines:
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                names.add(obj.get("event"))
    assert {"start", "exec", "end"} <= names, res.stderr
    return b"\n".join([*lines, *(json.dumps(e).encode() for e in own)]) + b"\n"


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_a_documented_jq_command_reads_a_mixed_journal(
    journal: bytes, where: str, command: str
) -> None:
    """The jq part of the command, fed the journal: no error, and it finds its events."""
    if shutil.which("jq") is None:
        pytest.fail("jq is needed (apt-get install jq; scripts/setup.sh installs it)")
    jq = shlex.split(command[command.rindex("| jq") + 2 :])
    res = subprocess.run(jq, input=journal, capture_output=True, timeout=60, check=False)
    assert res.returncode == 0 and not res.stderr, f"{where}: {command}\n{res.stderr!r}"
    assert res.stdout.strip(), f"{where}: {command} found nothing"
    assert b"the service's own JSON" not in res.stdout
