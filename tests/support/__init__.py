"""The test harness, shared by every test folder:

- ``support.build``: compiles tests/programs (and examples/ollama-like) once per content hash;
- ``support.launch``: runs vgpu-launch (to the end, or in the background) and parses its log;
- ``support.procs``: /proc readers, ``wait_for``, signals, and the signal state the tests
  start from;
- ``support.systemctl``: a stand-in ``systemctl`` for doctor and status where no systemd runs.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
