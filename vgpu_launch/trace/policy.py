"""What to do with one program's environment at exec: the decision, and the new environment.

Pure: takes the environment as a list of ``NAME=VALUE`` byte strings and returns a plan; the
injector turns the plan into memory writes and the launcher into CMD's environment.
"""

from __future__ import annotations

import enum
import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from . import preload

LD_PRELOAD = b"LD_PRELOAD"
_Entry = TypeVar("_Entry", bytes, int)


class Decision(str, enum.Enum):
    INJECTED = "injected"  # the program had no LD_PRELOAD: it now has the configured one
    MERGED = "merged"  # it had one without (all of) the configured libraries: merged in
    PRESENT = "present"  # it already had every configured library
    EXCLUDED = "excluded"  # matched an --exclude pattern: left exactly as it is
    SETUID = "setuid"  # runs with AT_SECURE: ld.so would ignore the preload, so it is left alone
    FAILED = "failed"  # the environment could not be read or written
    GONE = "gone"  # killed while its exec event was handled: it never ran an instruction

    @property
    def gives_preload(self) -> bool:
        """The program starts with every configured library in LD_PRELOAD."""
        return self in (Decision.INJECTED, Decision.MERGED, Decision.PRESENT)


@dataclass(frozen=True)
class Policy:
    preload: tuple[bytes, ...]
    env: tuple[tuple[bytes, bytes], ...] = ()  # set where missing
    force_env: tuple[tuple[bytes, bytes], ...] = ()  # set, overriding a different value
    exclude: tuple[str, ...] = ()

    def excludes(self, exe: str) -> bool:
        """Absolute-path patterns match the whole path, others the basename."""
        base = os.path.basename(exe)
        return any(
            fnmatch.fnmatchcase(exe if pat.startswith("/") else base, pat) for pat in self.exclude
        )


@dataclass
class Plan:
    decision: Decision
    preload_before: bytes | None = None
    preload_after: bytes | None = None
    # index in the old environment -> replacement entry; None removes the entry
    replace: dict[int, bytes | None] = field(default_factory=dict)
    append: list[bytes] = field(default_factory=list)
    env_set: list[str] = field(default_factory=list)  # names set or overridden

    @property
    def changes(self) -> bool:
        return bool(self.replace or self.append)


def _name(entry: bytes) -> bytes:
    eq = entry.find(b"=")
    return entry if eq < 0 else entry[:eq]


def plan(policy: Policy, env: Sequence[bytes], *, exe: str = "", secure: bool = False) -> Plan:
    """Decide for one program started with environment ``env``."""
    if exe and policy.exclude and policy.excludes(exe):
        return Plan(Decision.EXCLUDED, preload_before=_first_value(env, LD_PRELOAD))
    if secure:
        return Plan(Decision.SETUID, preload_before=_first_value(env, LD_PRELOAD))

    wanted = {LD_PRELOAD: None, **{n: None for n, _ in policy.env}}
    wanted.update({n: None for n, _ in policy.force_env})
    positions: dict[bytes, list[int]] = {}
    for i, entry in enumerate(env):
        name = _name(entry)
        if name in wanted:
            positions.setdefault(name, []).append(i)

    result = Plan(Decision.PRESENT)
    # LD_PRELOAD: one entry holding every configured library.
    where = positions.get(LD_PRELOAD, [])
    values = [env[i][len(LD_PRELOAD) + 1 :] for i in where]
    result.preload_before = values[0] if values else None
    if not where:
        result.decision = Decision.INJECTED
        result.preload_after = preload.merge(policy.preload, [])
        result.append.append(LD_PRELOAD + b"=" + result.preload_after)
    elif len(where) > 1 or not preload.contains_all(policy.preload, values[0]):
        result.decision = Decision.MERGED
        result.preload_after = preload.merge(policy.preload, values)
        result.replace[where[0]] = LD_PRELOAD + b"=" + result.preload_after
        for i in where[1:]:
            result.replace[i] = None
    else:
        result.preload_after = values[0]

    forced = {n for n, _ in policy.force_env}
    for name, value, force in [
        *((n, v, False) for n, v in policy.env if n not in forced),  # --force-env wins
        *((n, v, True) for n, v in policy.force_env),
    ]:
        where = positions.get(name, [])
        entry = name + b"=" + value
        if not where:
            result.append.append(entry)
        elif force and (env[where[0]] != entry or len(where) > 1):
            result.replace[where[0]] = entry
            for i in where[1:]:
                result.replace[i] = None
        else:
            continue
        result.env_set.append(name.decode(errors="replace"))
    return result


def apply(env: Sequence[bytes], p: Plan) -> list[bytes]:
    """The environment after ``p``: what the program will see."""
    return apply_to_entries(env, p)


def apply_to_entries(entries: Sequence[_Entry], p: Plan) -> list[_Entry | bytes]:
    """``p`` applied to anything indexed like the environment, e.g. the addresses of its strings
    on the initial stack: kept entries stay as they are, replacements and additions are bytes."""
    out = [p.replace.get(i, entry) for i, entry in enumerate(entries)]
    return [e for e in out if e is not None] + p.append


def _first_value(env: Sequence[bytes], name: bytes) -> bytes | None:
    prefix = name + b"="
    for entry in env:
        if entry.startswith(prefix):
            return entry[len(prefix) :]
    return None
