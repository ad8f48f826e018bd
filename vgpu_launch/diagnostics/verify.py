"""Proof of loading: after an injection, is the library really mapped into the process?

The launcher hands every exec it gave the preload to (decision injected, merged or present) to
``Verifier.schedule`` from the tracer thread, right after resuming the process. A daemon thread
of the verifier reads ``/proc/PID/maps`` a few milliseconds later, once ld.so has run, without
stopping the process, and logs one ``verify`` event:

- ``verified`` (info): every configured library is mapped;
- ``unverified`` (warning): one is not, with the likely reason (static binary, setuid, wrong word
  size, no file for this ``$LIB``, musl ignoring ``$LIB``, ld.so refusal);
- ``exited`` (debug): the program exited or exec'd another program before it could be checked
  (short-lived helpers; nothing can be said either way, so they are only counted).

``/proc/PID/environ`` is no evidence here: it shows the environment the program was started
with, never the one put in at exec time. The mapping is the truth.

The module also holds the /proc readers that ``vgpu-launch status`` shares.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..trace import preload
from . import libcheck

# Checks at these times (seconds) after the exec stop. Most programs are through ld.so within a
# millisecond; a check stops early once glibc's libc is mapped (ld.so maps LD_PRELOAD objects
# before any DT_NEEDED library, so by then the preload was either loaded or refused).
DELAYS = (0.005, 0.02, 0.1, 0.5, 2.0)
MAX_PENDING = 4096  # programs waiting for a check; beyond that they are counted as skipped

AT_SECURE = 23
# glibc's libc, which ld.so maps (not the kernel) after the LD_PRELOAD objects
_LIBC = re.compile(r"libc(?:\.so\.6|-\d[.\d]*\.so)$")
# the dynamic loader, mapped by the kernel at exec; musl's is its libc (ld-musl-*.so.1 is a
# link to .../x86_64-linux-musl/libc.so, and the maps show the link's target)
_INTERP = re.compile(r"ld-linux[-.\w]*\.so|ld-musl-[-\w]+\.so|ld(?:64)?\.so\.\d")
_DELETED = " (deleted)"
_REFUSED = "ld.so refused it"


# ---------------------------------------------------------------------------------------------
# reading a process


@dataclass(frozen=True)
class Maps:
    """The file-backed mappings of one process."""

    paths: frozenset[str]
    inodes: frozenset[tuple[int, int]]  # (st_dev, st_ino)
    interp: str | None  # the dynamic loader mapped into it, if any
    libc: bool  # glibc's libc is mapped: ld.so has dealt with LD_PRELOAD

    @property
    def musl(self) -> bool:
        return self.interp is not None and "musl" in self.interp

    def by_basename(self, name: str) -> list[str]:
        return sorted(p for p in self.paths if os.path.basename(p) == name)


def parse_maps(text: str) -> Maps:
    paths: set[str] = set()
    inodes: set[tuple[int, int]] = set()
    interp: str | None = None
    libc = False
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5]
        if path.endswith(_DELETED):
            path = path[: -len(_DELETED)]
        paths.add(path)
        ino = int(parts[4])
        if ino:
            major, _, minor = parts[3].partition(":")
            with contextlib.suppress(ValueError):
                inodes.add((os.makedev(int(major, 16), int(minor, 16)), ino))
        base = os.path.basename(path)
        if interp is None and (_INTERP.match(base) or (base == "libc.so" and "musl" in path)):
            interp = path
        if _LIBC.match(base):
            libc = True
    return Maps(frozenset(paths), frozenset(inodes), interp, libc)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def read_maps(pid: int | str) -> Maps | None:
    """The mappings of ``pid``; None if it is gone or a zombie (which has none).

    Raises PermissionError where this user may not read them."""
    text = _read_text(f"/proc/{pid}/maps")
    return parse_maps(text) if text else None


def read_secure(pid: int | str, word: int) -> bool | None:
    """AT_SECURE from the auxiliary vector: the program runs setuid/setgid or with file
    capabilities, and ld.so ignores LD_PRELOAD entries that contain a slash. None: unreadable."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data:
        return None
    step = 2 * word
    for off in range(0, len(data) - step + 1, step):
        key = int.from_bytes(data[off : off + word], "little")
        if key == 0:
            break
        if key == AT_SECURE:
            return int.from_bytes(data[off + word : off + step], "little") != 0
    return False


def exe_word(pid: int | str, maps: Maps | None = None) -> tuple[int | None, bool | None]:
    """(word size, static) of the program ``pid`` runs; None where it cannot be told."""
    word: int | None = None
    static: bool | None = None
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            head = f.read(64)
            if head[:4] == b"\x7fELF" and head[4] in (1, 2):
                word = 4 if head[4] == 1 else 8
                static = not _has_interp(f, head, word)
    except OSError:
        pass
    if maps is not None:
        if static is None:
            static = maps.interp is None
        if word is None and maps.interp is not None:
            base = os.path.basename(maps.interp)
            word = 4 if base in ("ld-linux.so.2", "ld-linux-armhf.so.3") else 8
    return word, static


def _has_interp(f: Any, head: bytes, word: int) -> bool:
    """Whether the ELF file has a PT_INTERP program header (a dynamically linked program)."""
    order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
    if word == 8:
        phoff = int.from_bytes(head[32:40], order)
        phentsize = int.from_bytes(head[54:56], order)
        phnum = int.from_bytes(head[56:58], order)
    else:
        phoff = int.from_bytes(head[28:32], order)
        phentsize = int.from_bytes(head[42:44], order)
        phnum = int.from_bytes(head[44:46], order)
    f.seek(phoff)
    table = f.read(phentsize * min(phnum, 256))
    for i in range(0, len(table) - 3, phentsize):
        if int.from_bytes(table[i : i + 4], order) == 3:  # PT_INTERP
            return True
    return False


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


def reason_missing(lib: str, word: int, exe: str = "", *, static: bool = False,
                   secure: bool = False, maps: Maps | None = None) -> str:
    """The likely reason a ``word``-byte program does not have ``lib`` mapped."""
    bits = word * 8
    if static:
        return ("static binary: no dynamic loader runs in it, so LD_PRELOAD has no effect "
                "(the programs it starts still get the preload)")
    if secure:
        return ("setuid/setgid or file capabilities (AT_SECURE): ld.so ignores LD_PRELOAD "
                "entries that contain a slash")
    if maps is not None and maps.musl and preload.has_tokens(lib):
        return f"musl's dynamic loader does not expand $LIB/$PLATFORM/$ORIGIN in {lib}"
    file = expand(lib, word, exe)
    if file is None:
        return f"no {bits}-bit dynamic loader on this host to expand {lib}"
    tokens = preload.has_tokens(lib)
    try:
        info = libcheck.elf_info(file)
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
    if info.type != libcheck.ET_DYN:
        return f"{file} is not a shared object"
    if info.word != word:
        return (f"wrong word size: {file} is a {info.word * 8}-bit library, "
                f"this is a {bits}-bit program")
    if maps is not None:
        same = [p for p in maps.by_basename(os.path.basename(file)) if p != file]
        if same:
            return f"another copy is mapped instead: {same[0]}"
    return (_REFUSED + " (its reason, 'ERROR: ld.so: object ... cannot be preloaded', "
            "is on the program's stderr), or LD_PRELOAD was removed before it ran")


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

    def __init__(self, libs: Sequence[str], log: Any, *, delays: Sequence[float] = DELAYS,
                 max_pending: int = MAX_PENDING) -> None:
        self.libs = list(libs)
        self.log = log
        self.delays = tuple(delays)
        self.max_pending = max_pending
        self.counts = {"verified": 0, "unverified": 0, "exited": 0, "skipped": 0}
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
                self.counts["skipped"] += 1
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
        o = item.outcome
        last = final or item.attempt + 1 >= len(self.delays)
        result, detail = self._check(o, last)
        if result == "pending":
            if not last:
                item.attempt += 1
                item.due = item.start + self.delays[item.attempt]
                heapq.heappush(self._heap, item)
                return
            result = "unverified"
        self._report(o, result, detail, time.monotonic() - item.start, last)

    def _check(self, o: Any, last: bool = False) -> tuple[str, dict[str, Any]]:
        """("verified" | "unverified" | "exited" | "pending", details). ``last``: no later
        check follows, decide now."""
        pid = o.pid
        if o.exe:
            try:
                now = os.readlink(f"/proc/{pid}/exe")
            except (FileNotFoundError, ProcessLookupError):
                return "exited", {}
            except OSError:
                now = o.exe
            if now.removesuffix(_DELETED) != o.exe.removesuffix(_DELETED):
                return "exited", {"note": f"now runs {now}"}
        try:
            text = _read_text(f"/proc/{pid}/maps")
        except OSError as exc:
            return "unverified", {"reason": f"cannot read /proc/{pid}/maps: {exc.strerror}"}
        if not text:
            return "exited", {}
        # the common case, cheaply: every library's path ends a line of the maps
        files = [self._file(lib, o.word, o.exe) for lib in self.libs]
        fast = [next((c for c in cands if f" {c}\n" in text), None) for cands in files]
        if all(fast):
            return "verified", {"mapped": sorted({f for f in fast if f})}
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
            return "verified", {"mapped": sorted(mapped.values())}
        secure = bool(read_secure(pid, o.word))
        done = o.static or secure or maps.libc  # ld.so has dealt with LD_PRELOAD
        if not (done or last):
            return "pending", {}
        reasons = {
            lib: reason_missing(lib, o.word, o.exe, static=o.static, secure=secure, maps=maps)
            for lib in missing
        }
        if not done and all(r.startswith(_REFUSED) for r in reasons.values()):
            return "unverified", {"missing": missing}  # no reason known: _report says when
        return "unverified", {"missing": missing, "reason": _one_reason(reasons)}

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

    def _report(self, o: Any, result: str, detail: dict[str, Any], after: float,
                last: bool) -> None:
        self.counts[result] += 1
        fields: dict[str, Any] = {
            "pid": o.pid, "exe": o.exe, "result": result, "after_ms": round(after * 1000, 1)
        }
        if result == "verified":
            self.log.info("verify", **fields, mapped=detail.get("mapped", []))
        elif result == "exited":
            self.log.debug("verify", **fields, **detail)
        else:
            fields["bits"] = o.word * 8
            detail.setdefault("missing", list(self.libs))
            if "reason" not in detail:
                detail.setdefault(
                    "reason",
                    f"not mapped {round(after * 1000)} ms after exec"
                    + (", when vgpu-launch ended" if last and after < self.delays[-1] else "")
                    + " (ld.so still busy, or it refused the library: see the program's "
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
