"""The signal state vgpu-launch was started with, so CMD gets it back.

CPython sets SIGPIPE and SIGXFSZ to ignored before any Python code runs; ``bin/vgpu-launch``
records the ignored set (``SigIgn`` of /proc/self/status) in ``_VGPU_LAUNCH_SIGIGN`` before
starting Python. Without it (an entry point made by pip), those two are taken as default, which
is what a shell would have given CMD. The signal mask is untouched by CPython and read directly.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

SIGIGN_VAR = "_VGPU_LAUNCH_SIGIGN"
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass(frozen=True)
class SignalState:
    mask: frozenset[int]
    ignored: frozenset[int]

    def restore(self) -> None:
        """In the child, before exec: dispositions and mask as vgpu-launch found them.

        Caught signals revert to default at exec by themselves; only SIG_IGN survives exec,
        so it is what must match exactly.
        """
        for sig in range(1, signal.NSIG):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                current = signal.getsignal(sig)
            except ValueError:
                continue
            want_ignored = sig in self.ignored
            if want_ignored and current is not signal.SIG_IGN:
                signal.signal(sig, signal.SIG_IGN)
            elif not want_ignored and current is signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)


def _mask_bits(hexmask: str) -> frozenset[int]:
    bits = int(hexmask, 16)
    return frozenset(sig for sig in range(1, 65) if bits & (1 << (sig - 1)))


def capture(environ: dict[str, str]) -> SignalState:
    """Read (and remove from ``environ``) the start-up state."""
    recorded = environ.pop(SIGIGN_VAR, None)
    ignored: set[int] = set()
    if recorded:
        try:
            ignored = set(_mask_bits(recorded))
        except ValueError:
            recorded = None
    if not recorded:
        for sig in range(1, signal.NSIG):
            try:
                if signal.getsignal(sig) is signal.SIG_IGN and sig not in _PYTHON_IGNORES:
                    ignored.add(sig)
            except ValueError:
                continue
    mask = frozenset(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    return SignalState(mask=mask, ignored=frozenset(ignored))




__all__ = ["SIGIGN_VAR", "SignalState", "capture"]
