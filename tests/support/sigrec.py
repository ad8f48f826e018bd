"""Talking to tests/programs/sigrec.c, the CMD that records every signal it gets: one
``sig=N code=C pid=P value=V`` line each, ``done ...`` when its stdin closes."""

from __future__ import annotations

import os
import signal

from support.launch import Started
from support.procs import parse_sig

# Sent last: anything forwarded before it has arrived by then.
MARKER = signal.SIGRTMIN + 5


def next_signal(run: Started) -> dict[str, int]:
    """The next signal sigrec recorded."""
    return parse_sig(run.out.expect(r"^sig=.*").group(0))


def finish(run: Started) -> list[dict[str, int]]:
    """Send the marker, wait for it, end CMD (which must exit 0); return the signals that came
    before the marker and were not read yet: the unexpected ones."""
    os.kill(run.pid, MARKER)
    extra = []
    while (got := next_signal(run))["sig"] != MARKER:
        extra.append(got)
    run.close_stdin()
    run.out.expect(r"^done ")
    status = run.wait_status()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, run.stderr()
    return extra
