"""Progress of a push or pull: a byte counter shared by the transfer threads, drawn as one line
on stderr when stderr is a terminal (never otherwise), and handed to an optional callback.

The callback (``on_bytes(done, total)``) runs in the transfer thread that moved the bytes; an
exception it raises aborts the transfer, as an interruption would (what the resume tests use).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

ProgressCallback = Callable[[int, int], None]


class Progress:
    def __init__(self, label: str, total: int, callback: ProgressCallback | None = None, *, tty: bool | None = None):
        self.label, self.total, self.done = label, total, 0
        self._callback = callback
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._drawn = 0.0
        self._start = time.monotonic()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            done = self.done
            now = time.monotonic()
            draw = self._tty and (now - self._drawn >= 0.2 or done >= self.total)
            if draw:
                self._drawn = now
        if draw:
            self._draw(done, now)
        if self._callback is not None:
            self._callback(done, self.total)

    def _draw(self, done: int, now: float) -> None:
        pct = 100.0 * done / self.total if self.total else 100.0
        rate = done / max(now - self._start, 1e-6) / (1 << 20)
        width = 30
        fill = int(width * pct / 100)
        bar = "#" * fill + "." * (width - fill)
        sys.stderr.write(f"\r{self.label} [{bar}] {pct:5.1f}% {done >> 20}/{self.total >> 20} MiB {rate:7.1f} MiB/s")
        sys.stderr.flush()

    def finish(self) -> None:
        if self._tty:
            self._draw(self.done, time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()


__all__ = ["Progress", "ProgressCallback"]
