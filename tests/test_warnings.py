"""A warning means a real process runs without the shim: processes killed at their exec event,
programs re-executed under the same pid, and programs still starting when CMD exits are not
warned about."""

from __future__ import annotations

from typing import Any

import pytest
import robustlib as rl
from robustlib import FAST

ATTEMPTS = 5  # runs of a racy shape before concluding that the race cannot be hit here


def _warnings(run: rl.Run) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("level") in ("warning", "error")]


def test_children_killed_at_their_exec_event_are_not_warnings(built: rl.Built) -> None:
    """Children SIGKILLed while the tracer handles their exec event never run a single
    instruction: they are logged at debug level as `gone`, never as `failed`."""
    for _ in range(ATTEMPTS):
        run = rl.launch(
            built,
            ["--log-level", "debug", "--preload", built.lib, "--",
             built.execkill, "60", "3000", built.rprobe],
            env=FAST,
        )
        assert run.returncode == 0, run.describe()
        assert _warnings(run) == [], run.describe()
        assert run.end["counts"]["failed"] == 0, run.describe()
        gone = [e for e in run.of("exec") if e["decision"] == "gone"]
        assert all(e["level"] == "debug" for e in gone), run.describe()
        assert len(gone) == run.end["counts"]["gone"]
        if gone:
            return
    pytest.fail(f"no child was killed during its exec event in {ATTEMPTS} runs: the race this "
                "test is about was not reached on this machine")
