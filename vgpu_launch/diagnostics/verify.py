"""Proof of loading: after an injection, is the library really mapped into the process?

The launcher hands every exec it gave the preload to (decision injected, merged or present) to
``Verifier.schedule`` from the tracer thread, right after resuming the process. A daemon thread
of the verifier reads ``/proc/PID/maps`` a few milliseconds later, once ld.so has run, without
stopping the process, and logs one ``verify`` event:

- ``verified`` (info): every configured library is mapped;
- ``unverified`` (warning): one is not, with the likely reason (static binary, setuid, wrong word
  size, no file for this ``$LIB``, musl ignoring ``$LIB``, ld.so refusal);
- ``exited`` (debug): the program exited or exec'd again before it could be checked
  (short-lived helpers; nothing can be said either way, so they are only counted). A program
  is named by its pid *and its exec* (the tracer numbers every exec), not by its path: a
  process that executes the same file again is a new program;
- ``skipped`` (debug): its ld.so was still at work when vgpu-launch ended (CMD exited while it
  was starting), so nothing can be said; also counted, without an event, when too many
  programs wait for a check.

``/proc/PID/environ`` is no evidence here: it shows the environment the program was started
with, never the one put in at exec time. The mapping is the truth.

``vgpu-launch status`` shares the reasons (``reason_missing``) and the lookups of a library
in a process's mappings (``find_mapped``); /proc is read through procfs.py.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import heapq
import itertools
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import elf, procfs
from ..procfs import DELETED, Maps, parse_maps
from ..trace import preload
from . import libcheck

# Checks at these times (seconds) after the exec stop. Most programs are through ld.so within a
# millisecond; a check stops early once glibc's libc is mapped (ld.so maps LD_PRELOAD objects
# before any DT_NEEDED library, so by then the preload was either loaded or refused).
DELAYS = (0.005, 0.02, 0.1, 0.5, 2.0)
MAX_PENDING = 4096  # programs waiting for a check; beyond that they are counted as skipped

_REFUSED = "ld.so refused it"


class Result(str, enum.Enum):
    """The outcome of checking one program (the ``result`` field of its verify event)."""

    VERIFIED = "verified"  # every configured library is mapped (info)
    UNVERIFIED = "unverified"  # one is not (warning, with the likely reason)
    EXITED = "exited"  # it exited or exec'd another program first (debug, counted only)
    SKIPPED = "skipped"  # not checked: too many were waiting (counted only)
    PENDING = "pending"  # ld.so may still be busy: check again (never logged)


# ---------------------------------------------------------------------------------------------
# the configured libraries, as ld.so would find them for one program


def expand(lib: str, word: int, exe: str = "") -> str | None:
    """The file ld.so loads for ``lib`` in a ``word``-byte program ``exe``; None where it cannot
    be told ($LIB/$PLATFORM with no loader of that size here, $ORIGIN without the program)."""
    if not preload.has_tokens(lib):
        return lib
    values = libcheck.token_values(word)
    if values is None:
        return None
    origin = os.path.dirname(exe) if exe.startswith("/") else None
    return preload.expand(lib, lib=values[0], platform=values[1], origin=origin)


def _stat_key(path: str, root: str = "") -> tuple[int, int] | None:
    for candidate in ((root + path) if root else None, path):
        if candidate is None:
            continue
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        return st.st_dev, st.st_ino
    return None


def find_mapped(maps: Maps, file: str | None, root: str = "") -> str | None:
    """The mapped path of ``file`` (by path, resolved path, or device and inode)."""
    if file is None:
        return None
    if file in maps.paths:
        return file
    real = os.path.realpath(file)
    if real in maps.paths:
        return real
    key = _stat_key(file, root)
    if key is not None and key in maps.inodes:
        return file
    return None


def reason_missing(
    lib: str,
    word: int,
    exe: str = "",
    *,
    static: bool = False,
    secure: bool = False,
    maps: Maps | None = None,
) -> str:
    """The likely reason a ``word``-byte program does not have ``lib`` mapped."""
    bits = word * 8
    if static:
        return (
            "static binary: no dynamic loader runs in it, so LD_PRELOAD has no effect "
            "(the programs it starts still get the preload)"
        )
    if secure:
        return (
            "setuid/setgid or file capabilities (AT_SECURE): ld.so ignores LD_PRELOAD "
            "entries that contain a slash"
        )
    if maps is not None and maps.musl and preload.has_tokens(lib):
        return f"musl's dynamic loader does not expand $LIB/$PLATFORM/$ORIGIN in {lib}"
    file = expand(lib, word, exe)
    if file is None:
        return f"no {bits}-bit dynamic loader on this host to expand {lib}"
    tokens = preload.has_tokens(lib)
    try:
        info = elf.elf_info(file)
    except FileNotFoundError:
        if tokens:
            return f"missing file for this $LIB: {file} not found ({bits}-bit program)"
        return f"{file} not found"
    except PermissionError:
        return f"{file} is not readable by this program's user"
    except OSError as exc:
        return f"{file}: {exc.strerror}"
    if info is None:
        return f"{file} is not an ELF file"
    if info.type != elf.ET_DYN:
        return f"{file} is not a shared object"
    if info.word != word:
        return (
            f"wrong word size: {file} is a {info.word * 8}-bit library, "
            f"this is a {bits}-bit program"
        )
    if maps is not None:
        same = [p for p in maps.by_basename(os.path.basename(file)) if p != file]
        if same:
            return f"another copy is mapped instead: {same[0]}"
    return (
        _REFUSED + " (its reason, 'ERROR: ld.so: object ... cannot be preloaded', "
        "is on the program's stderr), or LD_PRELOAD was removed before it ran"
    )


# ---------------------------------------------------------------------------------------------
# the verifier


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    outcome: Any = field(compare=False)
    start: float = field(compare=False)
    attempt: int = field(compare=False, default=0)


class Verifier:
    """Checks, without stopping anything, that each injected program really mapped the
    configured libraries, and logs the result. Never raises into its caller."""

    def __init__(
        self,
        libs: Sequence[str],
        log: Any,
        *,
        delays: Sequence[float] = DELAYS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.libs = list(libs)
        self.log = log
        self.delays = tuple(delays)
        self.max_pending = max_pending
        self.counts = {r.value: 0 for r in Result if r is not Result.PENDING}
        self._incoming: collections.deque[tuple[float, Any]] = collections.deque()
        self._heap: list[_Pending] = []
        self._seq = itertools.count()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # held while checking; finish() takes it last
        self._thread: threading.Thread | None = None
        self._closed = False
        self._files: dict[tuple[str, int, str], tuple[str, ...]] = {}
        # ld.so's $LIB/$PLATFORM come from running the loaders: do it now, never from the
        # verifier thread (the tracer reaps every child of this process).
        if any(preload.has_tokens(lib) for lib in self.libs):
            for word in (8, 4):
                # a missing value only weakens the reasons
                with contextlib.suppress(Exception):
                    libcheck.token_values(word)

    # -- called from the tracer thread -------------------------------------------------------

    def schedule(self, outcome: Any) -> None:
        """Queue ``outcome`` (an injector.Outcome) for a check. Cheap, never blocks or raises."""
        try:
            if self._closed or not self.libs:
                return
            if len(self._incoming) + len(self._heap) >= self.max_pending:
                self.counts[Result.SKIPPED.value] += 1
                return
            self._incoming.append((time.monotonic(), outcome))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="verify", daemon=True)
                self._thread.start()
            self._wake.set()
        except Exception:  # must never disturb the tracer
            pass

    # -- the verifier thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            timeout = None
            with self._lock:
                try:
                    self._drain()
                    now = time.monotonic()
                    while self._heap and self._heap[0].due <= now:
                        self._safe_attempt(heapq.heappop(self._heap), final=False)
                    if self._heap:
                        timeout = max(0.0, self._heap[0].due - time.monotonic())
                except Exception as exc:  # keep verifying the next ones
                    self._log_internal(exc)
            self._wake.wait(timeout)
            self._wake.clear()

    def _drain(self) -> None:
        while self._incoming:
            start, outcome = self._incoming.popleft()
            heapq.heappush(
                self._heap, _Pending(start + self.delays[0], next(self._seq), outcome, start)
            )

    def _safe_attempt(self, item: _Pending, *, final: bool) -> None:
        try:
            self._attempt(item, final=final)
        except Exception as exc:  # one bad entry must not stop the others
            self._log_internal(exc)

    def _attempt(self, item: _Pending, *, final: bool) -> None:
        """One check; ``final``: vgpu-launch is ending, no later check will come."""
        o = item.outcome
        last = item.attempt + 1 >= len(self.delays)
        result, detail = self._check(o, last)
        if result is Result.PENDING:
            if final:
                # Caught starting when CMD exited: its ld.so is still at work, and it will
                # load the library or not after vgpu-launch is gone. Nothing to say.
                result = Result.SKIPPED
                detail = {"note": "ld.so had not finished when vgpu-launch ended"}
            elif not last:
                item.attempt += 1
                item.due = item.start + self.delays[item.attempt]
                heapq.heappush(self._heap, item)
                return
            else:
                result = Result.UNVERIFIED
        self._report(o, result, detail, time.monotonic() - item.start)

    def _check(self, o: Any, last: bool = False) -> tuple[Result, dict[str, Any]]:
        """The result, and its details. ``last``: no later check follows, decide now."""
        pid = o.pid
        if o.superseded():
            return Result.EXITED, {"note": "exec'd again or exited"}
        if o.exe:
            try:
                now = procfs.exe(pid)
            except (FileNotFoundError, ProcessLookupError):
                return Result.EXITED, {}
            except OSError:
                now = o.exe
            if now.removesuffix(DELETED) != o.exe.removesuffix(DELETED):
                return Result.EXITED, {"note": f"now runs {now}"}
        try:
            text = procfs.maps_text(pid)
        except OSError as exc:
            return Result.UNVERIFIED, {"reason": f"cannot read /proc/{pid}/maps: {exc.strerror}"}
        if not text:
            return Result.EXITED, {}
        if o.superseded():  # the maps may be those of the next program
            return Result.EXITED, {"note": "exec'd again or exited"}
        # the common case, cheaply: every library's path ends a line of the maps
        files = [self._file(lib, o.word, o.exe) for lib in self.libs]
        fast = [next((c for c in cands if f" {c}\n" in text), None) for cands in files]
        if all(fast):
            return Result.VERIFIED, {"mapped": sorted({f for f in fast if f})}
        maps = parse_maps(text)
        mapped: dict[str, str] = {}
        missing: list[str] = []
        for lib in self.libs:
            found = find_mapped(maps, expand(lib, o.word, o.exe))
            if found is None:
                missing.append(lib)
            else:
                mapped[lib] = found
        if not missing:
            return Result.VERIFIED, {"mapped": sorted(mapped.values())}
        secure = bool(procfs.secure(pid, o.word))
        done = o.static or secure or maps.libc  # ld.so has dealt with LD_PRELOAD
        if not (done or last):
            return Result.PENDING, {}
        reasons = {
            lib: reason_missing(lib, o.word, o.exe, static=o.static, secure=secure, maps=maps)
            for lib in missing
        }
        if not done and all(r.startswith(_REFUSED) for r in reasons.values()):
            return Result.UNVERIFIED, {"missing": missing}  # no reason known: _report says when
        return Result.UNVERIFIED, {"missing": missing, "reason": _one_reason(reasons)}

    def _file(self, lib: str, word: int, exe: str) -> tuple[str, ...]:
        """The paths under which ``lib`` shows in the maps of a ``word``-byte ``exe``."""
        key = (lib, word, exe if "ORIGIN" in lib else "")
        found = self._files.get(key)
        if found is None:
            file = expand(lib, word, exe)
            found = () if file is None else tuple(dict.fromkeys((file, os.path.realpath(file))))
            if len(self._files) < 256:
                self._files[key] = found
        return found

    def _report(self, o: Any, result: Result, detail: dict[str, Any], after: float) -> None:
        self.counts[result.value] += 1
        fields: dict[str, Any] = {
            "pid": o.pid,
            "exe": o.exe,
            "result": result.value,
            "after_ms": round(after * 1000, 1),
        }
        if result is Result.VERIFIED:
            self.log.info("verify", **fields, mapped=detail.get("mapped", []))
        elif result in (Result.EXITED, Result.SKIPPED):
            self.log.debug("verify", **fields, **detail)
        else:
            fields["bits"] = o.word * 8
            detail.setdefault("missing", list(self.libs))
            if "reason" not in detail:
                detail.setdefault(
                    "reason",
                    f"not mapped {round(after * 1000)} ms after exec"
                    " (ld.so still busy, or it refused the library: see the program's "
                    "stderr)",
                )
            self.log.warning("verify", **fields, **detail)

    def _log_internal(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self.log.error("verify-failed", error=f"{type(exc).__name__}: {exc}")

    # -- the end -----------------------------------------------------------------------------

    def finish(self, timeout: float = 1.0) -> dict[str, int]:
        """Check what is still pending once, stop, and return the counts
        {verified, unverified, exited, skipped}."""
        try:
            self._closed = True
            self._wake.set()
            if self._lock.acquire(timeout=timeout):
                try:
                    self._drain()
                    # give programs exec'd just now the time of a first check (ld.so's)
                    if self._heap:
                        first = max(i.start for i in self._heap) + self.delays[0]
                        time.sleep(min(0.1, max(0.0, first - time.monotonic())))
                    while self._heap:
                        self._safe_attempt(heapq.heappop(self._heap), final=True)
                finally:
                    self._lock.release()
        except Exception as exc:  # the end event must still be written
            self._log_internal(exc)
        return dict(self.counts)


def _one_reason(reasons: dict[str, str]) -> str:
    texts = list(dict.fromkeys(reasons.values()))
    if len(texts) == 1:
        return texts[0]
    return "; ".join(f"{lib}: {why}" for lib, why in reasons.items())


def libraries_text(libs: Iterable[str]) -> str:
    return ", ".join(libs) or "(none)"
