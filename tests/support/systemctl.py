"""A stand-in for systemctl where no systemd runs: answers ``show`` from a table, the way the
real one prints unit properties."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def install(bindir: Path, units: dict[str, dict[str, Any]], fail: str = "") -> None:
    """Put ``systemctl`` in ``bindir``: ``show UNIT`` prints ``units[UNIT]`` (a list value gives
    one line each); with ``fail``, every call prints it and exits 1."""
    bindir.mkdir(parents=True, exist_ok=True)
    data = bindir / "units.json"
    data.write_text(json.dumps(units))
    script = bindir / "systemctl"
    script.write_text(f"""#!{sys.executable}
import json, sys
if {fail!r}:
    sys.stderr.write({fail!r} + "\\n")
    sys.exit(1)
units = json.load(open({str(data)!r}))
args = sys.argv[1:]
if not args or args[0] != "show":
    sys.exit("fake systemctl: only 'show'")
name = args[-1]
props = units.get(name) or units.get(name + ".service")
if props is None:
    print("Id=" + name)
    print("LoadState=not-found")
    sys.exit(0)
for key, value in props.items():
    for v in (value if isinstance(value, list) else [value]):
        print(f"{{key}}={{v}}")
""")
    script.chmod(0o755)
