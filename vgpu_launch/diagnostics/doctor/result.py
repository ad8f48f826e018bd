"""One check's result: its status, what was checked, why, how to fix it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Status(enum.Enum):
    OK = "ok"
    NOTE = "note"  # worth knowing, nothing to fix
    WARN = "warn"
    FAIL = "fail"


OK, NOTE, WARN, FAIL = Status.OK, Status.NOTE, Status.WARN, Status.FAIL


@dataclass
class Check:
    status: Status
    what: str
    why: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "what": self.what, "why": self.why, "fix": self.fix}


class Checks(list[Check]):
    def add(self, status: Status, what: str, why: str, fix: str = "") -> Check:
        c = Check(status, what, why, fix)
        self.append(c)
        return c

    @property
    def failed(self) -> bool:
        return any(c.status is FAIL for c in self)
