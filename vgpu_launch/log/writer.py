"""A bounded queue and the thread that drains it into one sink.

The threads that log (the tracer among them) only append to the queue, under a lock held for
a few instructions: they never render, never write, never wait for a reader. When the queue is
full the event is dropped and counted; a ``log-dropped`` event with the count is queued before
the next event that fits (or written as soon as the writer has emptied the queue), so the
reader sees where lines are missing and how many.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Protocol

# Events waiting for one sink. At about 1-2 KB an event (argv clipped by clip.clip) this
# bounds the memory a stalled reader can cost to a few MB.
QUEUE_MAX = 1024

Item = tuple[float, str, str, dict[str, Any]]  # (time, level, event, fields)


class Dropped(Exception):
    """Raised by a sink that gave up on one event (journald refused it under pressure)."""


class Sink(Protocol):
    def write(self, item: Item) -> None:
        """Render and write one event; may block (that is what the writer thread is for)."""


class Writer:
    def __init__(
        self, name: str, sink: Sink, level: int, *, summary: bool = False, capacity: int = QUEUE_MAX
    ) -> None:
        self.name = name
        self.sink = sink
        self.level = level  # events below this level are not queued here
        self.summary = summary  # also gets the end event, for the one-line summary
        self.capacity = capacity
        self.dropped_total = 0
        self.errors = 0
        self._items: collections.deque[Item | threading.Event] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._dropped = 0  # not yet reported by a log-dropped event
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- the threads that log -----------------------------------------------------------------

    def put(self, item: Item, *, always: bool = False) -> None:
        """Queue ``item``, or drop and count it if the queue is full (``always``: the end
        event, queued even then: it is the last one)."""
        with self._cond:
            if len(self._items) >= self.capacity and not always:
                self._dropped += 1
                self.dropped_total += 1
                return
            if self._dropped:
                self._items.append(self._dropped_item())
            self._items.append(item)
            self._cond.notify()

    def _dropped_item(self) -> Item:
        # With self._cond held.
        n, self._dropped = self._dropped, 0
        fields = {
            "dropped": n,
            "sink": self.name,
            "message": f"{n} events were not written: the {self.name} reader was too slow",
        }
        return (time.time(), "warning", "log-dropped", fields)

    # -- the writer thread --------------------------------------------------------------------

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"log-{self.name}", daemon=True
                )
                self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is written, at most ``timeout`` seconds."""
        done = threading.Event()
        with self._cond:
            if self._dropped:
                self._items.append(self._dropped_item())
            self._items.append(done)
            self._cond.notify()
        self.start()
        return done.wait(max(0.0, timeout))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    if self._dropped:  # caught up after a loss: say so now
                        self._items.append(self._dropped_item())
                        break
                    self._cond.wait()
                item = self._items.popleft()
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                if item[2] == "end":  # what this sink lost, in the line that closes it
                    item = (
                        *item[:3],
                        {**item[3], "log_dropped": self.dropped_total, "log_errors": self.errors},
                    )
                self.sink.write(item)
            except Dropped:
                with self._cond:
                    if item[2] == "log-dropped":  # the count goes into the next one
                        self._dropped += item[3]["dropped"]
                    else:
                        self._dropped += 1
                        self.dropped_total += 1
            except Exception:  # nothing raised here may end the writer (or reach anyone else)
                self.errors += 1
