"""GroupSignalLedger's bookkeeping: which copy of ours each signal CMD took explains.

"Ours" is a helper process here, with SIGUSR1 and SIGCONT blocked so that a copy can be pending
in it (``ShdPnd``, read from /proc as the ledger does); the main thread's buffer is a stand-in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from vgpu_launch import forwarding
from vgpu_launch.forwarding import GroupSignalLedger, shared_pending
from vgpu_launch.siginfo import SI_USER, SigInfo

SIG = signal.SIGUSR1
A, B = 1111, 2222  # two senders


class Buffer:
    """The main thread's SignalWaiter, as the ledger sees it."""

    def __init__(self) -> None:
        self.holds = (0, 0)

    def taken(self) -> tuple[int, int]:
        return self.holds

    def done(self) -> None:
        self.holds = (0, 0)


@pytest.fixture
def us() -> Iterator[int]:
    """A process with SIGUSR1 and SIGCONT blocked: a copy sent to it stays pending."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {SIG, signal.SIGCONT})
    try:
        proc = subprocess.Popen(["sleep", "60"])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    yield proc.pid
    proc.kill()
    proc.wait()


def took(sender: int) -> SigInfo:
    return SigInfo(SIG, SI_USER, sender, 0, 0, b"")


@contextlib.contextmanager
def pending(pid: int) -> Iterator[None]:
    """A copy of SIGUSR1 pending in ``pid`` (taken away again at the end)."""
    os.kill(pid, SIG)
    assert SIG in shared_pending(pid)
    yield


def ledger_for(pid: int) -> tuple[GroupSignalLedger, Buffer]:
    ledger = GroupSignalLedger(pid)
    buf = Buffer()
    ledger.attach(buf)  # type: ignore[arg-type]
    return ledger, buf


def test_twin_of_a_pending_copy(us: int) -> None:
    """CMD took the signal while ours was pending: the same kill; that copy is not forwarded."""
    ledger, buf = ledger_for(us)
    with pending(us):
        assert ledger.note(SIG, took(A))
        buf.holds = (SIG, A)  # the main thread takes its copy
        assert ledger.take(SIG, A)
        assert buf.holds == (0, 0)  # settled


def test_twin_of_the_copy_being_decided(us: int) -> None:
    """CMD took it while the main thread was deciding on ours (same sender): the same kill."""
    ledger, buf = ledger_for(us)
    buf.holds = (SIG, A)
    assert ledger.note(SIG, took(A))
    assert ledger.take(SIG, A)


def test_signal_sent_to_cmd_alone(us: int) -> None:
    """Nothing of ours pending or being decided: not a group kill; a later copy is forwarded."""
    ledger, buf = ledger_for(us)
    assert not ledger.note(SIG, took(A))
    buf.holds = (SIG, A)
    assert not ledger.take(SIG, A)


def test_other_sender_while_ours_is_decided(us: int) -> None:
    """While the main thread decides on a copy from A, CMD took one from B: not its twin."""
    ledger, buf = ledger_for(us)
    buf.holds = (SIG, A)
    assert not ledger.note(SIG, took(B))
    assert not ledger.take(SIG, A)


def test_a_stale_note_does_not_swallow_a_later_copy(us: int) -> None:
    """CMD took a copy from B while ours (from A) was pending: once ours is decided, that note
    is spent, and a later copy from B alone is forwarded, not taken for a group kill."""
    ledger, buf = ledger_for(us)
    with pending(us):
        assert ledger.note(SIG, took(B))
    buf.holds = (SIG, A)  # ours, from A
    assert not ledger.take(SIG, A)
    ledger.settle(SIG, A)
    buf.holds = (SIG, B)  # later, B sends to vgpu-launch alone
    assert not ledger.take(SIG, B)


def test_one_note_per_copy(us: int) -> None:
    """Two copies CMD took from A while one of ours was pending explain one copy, not two."""
    ledger, buf = ledger_for(us)
    with pending(us):
        assert ledger.note(SIG, took(A))
        assert not ledger.note(SIG, took(A))
    buf.holds = (SIG, A)
    assert ledger.take(SIG, A)
    buf.holds = (SIG, A)  # the next copy from A
    assert not ledger.take(SIG, A)


def test_a_note_for_the_next_copy_survives_this_one(us: int) -> None:
    """Deciding on a copy from A while another (from B) is pending: CMD's copy from B is the
    pending one's twin, and still explains it after A's copy is settled."""
    ledger, buf = ledger_for(us)
    buf.holds = (SIG, A)
    with pending(us):
        assert ledger.note(SIG, took(B))
    ledger.settle(SIG, A)
    buf.holds = (SIG, B)
    assert ledger.take(SIG, B)


def test_forget_drops_notes_for_discarded_copies(us: int) -> None:
    """A SIGCONT CMD took while ours was pending, and then a stop signal reached us (which
    discards our pending SIGCONT): that note never gets its copy and must not stand for the
    next SIGCONT, sent to vgpu-launch alone."""
    ledger, buf = ledger_for(us)
    os.kill(us, signal.SIGCONT)  # blocked there: stays pending
    assert signal.SIGCONT in shared_pending(us)
    assert ledger.note(signal.SIGCONT, SigInfo(signal.SIGCONT, SI_USER, A, 0, 0, b""))
    buf.holds = (signal.SIGTSTP, A)  # the main thread takes a stop signal
    ledger.began()
    ledger.forget(frozenset({signal.SIGCONT}))
    ledger.settle(signal.SIGTSTP, A)
    buf.holds = (signal.SIGCONT, A)
    assert not ledger.take(signal.SIGCONT, A)


def test_a_copy_still_on_its_way_after_its_sender_finished_is_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender ran past the time a copy may spend in transit, then sent ours: the copy,
    taken by our main thread but not yet in its buffer, is still waited for."""
    # Wide margins: a copy may spend 0.5 s in transit, the sender runs 1 s, and ours reaches
    # the buffer 0.1 s after the sender stopped running.
    monkeypatch.setattr(forwarding, "IN_TRANSIT", 0.5)
    monkeypatch.setattr(forwarding, "KILL_IN_FLIGHT", 10.0)
    spin = ["sh", "-c", "while :; do :; done"]
    with subprocess.Popen(spin) as main, subprocess.Popen(spin) as sender:
        try:
            ledger, buf = ledger_for(main.pid)  # "our" main thread: running (state R)

            def copy_arrives() -> None:
                time.sleep(1.0)
                os.kill(sender.pid, signal.SIGSTOP)  # done with its kill: no longer on a CPU
                time.sleep(0.1)
                buf.holds = (SIG, sender.pid)  # our copy, from the same sender, in the buffer

            arrival = threading.Thread(target=copy_arrives)
            arrival.start()
            assert ledger.note(SIG, took(sender.pid))
            arrival.join()
        finally:
            main.kill()
            sender.kill()
