"""An exec's Outcome and the event it is logged as."""

from __future__ import annotations

import pytest

from vgpu_launch.trace.injector import Outcome
from vgpu_launch.trace.policy import Decision


def test_decisions_that_give_the_preload() -> None:
    """injected, merged and present leave the program with the preload; the others do not."""
    given = {d for d in Decision if d.gives_preload}
    assert given == {Decision.INJECTED, Decision.MERGED, Decision.PRESENT}


def test_exec_event_of_an_injection() -> None:
    """The event lists the fields in a fixed order; optional ones only when set."""
    o = Outcome(pid=7, decision=Decision.INJECTED, exe="/bin/x", argv=["x"], preload_after="/l.so")
    assert o.level == "info"
    assert o.to_event(1) == {
        "pid": 7, "ppid": 1, "exe": "/bin/x", "argv": ["x"], "preload_before": None,
        "decision": "injected", "preload_after": "/l.so", "static": False, "bits": 64,
        "elapsed_us": 0,
    }  # fmt: skip
    o.env_set, o.former_tid, o.note = ["A"], 9, "n"
    assert list(o.to_event(1))[-3:] == ["env_set", "former_tid", "note"]


@pytest.mark.parametrize(("killed", "action"), [(False, "runs without the preload"),
                                                (True, "killed (strict)")])  # fmt: skip
def test_exec_event_of_a_failure(killed: bool, action: str) -> None:
    """A failure is a warning with its reason and what became of the program."""
    o = Outcome(pid=7, decision=Decision.FAILED, word=4, reason="E", killed=killed)
    event = o.to_event(None)
    assert o.level == "warning"
    assert (event["bits"], event["reason"], event["action"]) == (32, "E", action)


def test_outcome_takes_keywords_only() -> None:
    """Positional construction is refused: a new field cannot shift the others."""
    with pytest.raises(TypeError):
        Outcome(7, Decision.FAILED)  # type: ignore[misc]
