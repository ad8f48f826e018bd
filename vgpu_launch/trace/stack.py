"""The initial process stack: parse the block the kernel builds at exec, and rebuild it.

At process entry the stack pointer points at::

    argc, argv[0..argc-1], NULL, envp[0..n-1], NULL, auxv pairs ..., AT_NULL, 0

followed (higher up) by padding, AT_RANDOM bytes, platform strings and the argument and
environment strings. The rebuild writes a new block that *ends* where the old one ended, so it
only needs room for the added strings and pointers below the old stack pointer (the old arrays
are dead once read). Everything above the old block, which the auxv points into, stays put.

Pure: works on a bytes snapshot of memory starting at the stack pointer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

AT_NULL = 0
AT_BASE = 7
AT_SECURE = 23
AT_EXECFN = 31

STACK_ALIGN = 16
_AUXV_WORDS = 2 * 128  # far more pairs than any kernel writes (AT_VECTOR_SIZE_BASE is 22)
_FORMAT = {4: "<I", 8: "<Q"}


class StackError(ValueError):
    """The memory does not hold a well-formed initial stack."""


@dataclass(frozen=True)
class InitialStack:
    sp: int
    word: int
    argv: tuple[int, ...]
    envp: tuple[int, ...]
    auxv: tuple[int, ...]  # flat key, value words, the AT_NULL pair included
    end: int  # address just past the AT_NULL pair

    def aux(self, key: int) -> int | None:
        it = iter(self.auxv)
        for k, v in zip(it, it, strict=False):
            if k == key:
                return v
        return None


def _words(buf: bytes, word: int, offset: int, count: int) -> tuple[int, ...]:
    fmt = f"<{count}{'I' if word == 4 else 'Q'}"
    try:
        return struct.unpack_from(fmt, buf, offset)
    except struct.error as exc:
        raise StackError(f"initial stack truncated at offset {offset}") from exc


def _null_terminated(buf: bytes, word: int, offset: int) -> tuple[int, ...]:
    """Pointer array starting at ``offset`` up to (not including) its NULL word."""
    zero = bytes(word)
    pos = offset
    while True:
        found = buf.find(zero, pos)
        if found < 0:
            raise StackError("pointer array not terminated")
        if (found - offset) % word == 0:
            break
        pos = found + 1
    return _words(buf, word, offset, (found - offset) // word)


def parse(buf: bytes, sp: int, word: int) -> InitialStack:
    """Parse the initial stack of a process from ``buf``, the memory starting at ``sp``."""
    if word not in _FORMAT:
        raise StackError(f"unsupported word size {word}")
    (argc,) = _words(buf, word, 0, 1)
    if argc > len(buf) // word:
        raise StackError(f"implausible argc {argc}")
    argv = _words(buf, word, word, argc)
    if _words(buf, word, word * (1 + argc), 1) != (0,):
        raise StackError("argv not NULL-terminated")
    env_off = word * (argc + 2)
    envp = _null_terminated(buf, word, env_off)
    aux_off = env_off + word * (len(envp) + 1)
    # The auxv has a few dozen pairs: unpack a generous slice at once, then find AT_NULL.
    available = (len(buf) - aux_off) // word
    words = _words(buf, word, aux_off, min(available, _AUXV_WORDS))
    for i in range(0, len(words) - 1, 2):
        if words[i] == AT_NULL:
            auxv = words[: i + 2]
            break
    else:
        raise StackError("auxv not terminated")
    pos = aux_off + len(auxv) * word
    return InitialStack(sp, word, argv, envp, auxv, sp + pos)


def read_string(buf: bytes, sp: int, addr: int) -> bytes:
    off = addr - sp
    if off < 0 or off >= len(buf):
        raise StackError(f"string at {addr:#x} outside the snapshot")
    end = buf.find(b"\0", off)
    if end < 0:
        raise StackError(f"string at {addr:#x} not terminated in the snapshot")
    return buf[off:end]


def strings(buf: bytes, sp: int, pointers: Sequence[int]) -> list[bytes]:
    """The NUL-terminated strings at ``pointers``.

    The kernel lays argument and environment strings out back to back, so one split normally
    reads them all; anything else falls back to one lookup per pointer.
    """
    if not pointers:
        return []
    start = pointers[0] - sp
    if 0 <= start < len(buf):
        parts = buf[start:].split(b"\0", len(pointers))
        if len(parts) > len(pointers):
            parts = parts[: len(pointers)]
            expected = accumulate((len(p) + 1 for p in parts[:-1]), initial=pointers[0])
            if tuple(expected) == tuple(pointers):
                return parts
    return [read_string(buf, sp, p) for p in pointers]


def rebuild(stack: InitialStack, env: Sequence[int | bytes]) -> tuple[int, bytes]:
    """A new block with environment ``env``: each entry either the address of a string kept
    where it is, or a new string (without its NUL). Returns the new stack pointer and the bytes
    to write there; they end exactly at ``stack.end``."""
    word = stack.word
    new_strings = [e + b"\0" for e in env if isinstance(e, bytes)]
    n_words = 1 + len(stack.argv) + 1 + len(env) + 1 + len(stack.auxv)
    arrays = n_words * word
    total = arrays + sum(map(len, new_strings))
    new_sp = (stack.end - total) & ~(STACK_ALIGN - 1)
    addr = new_sp + arrays
    pointers: list[int] = []
    for entry in env:
        if isinstance(entry, bytes):
            pointers.append(addr)
            addr += len(entry) + 1
        else:
            pointers.append(entry)
    words = [len(stack.argv), *stack.argv, 0, *pointers, 0, *stack.auxv]
    packed = struct.pack(f"<{n_words}{'I' if word == 4 else 'Q'}", *words)
    blob = packed + b"".join(new_strings)
    return new_sp, blob + bytes(stack.end - new_sp - len(blob))
