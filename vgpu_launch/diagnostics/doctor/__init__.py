"""``vgpu-launch doctor``: everything that would make vgpu-launch or the preload fail here.

Each check is one line, ``ok``/``note``/``warn``/``fail``, what, why and how to fix it. The exit
status is 0 only when nothing fails. The checks test what they can for real: ptrace by tracing
a child through an exec, each library by starting a program with it preloaded.

One module per concern: ``ptrace_probe``, ``configuration``, ``programs`` (--check and the
unit's CMD), ``library``, ``unit``; ``result`` holds what a check returns, ``report`` runs
them in order and renders the result.
"""

from __future__ import annotations

from .report import Request, run

__all__ = ["Request", "run"]
