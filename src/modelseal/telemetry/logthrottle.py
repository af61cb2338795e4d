"""A log line that repeats at most once per interval, with a count of what it stood for.

The alert sinks and the export run on every detection; a receiver that is down, a full
queue or a syslog socket that refuses must say so without flooding the log. The lines
carry counts, hosts and error class names only: never an alert body or a URL path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class ThrottledLog:
    """``note(fmt, *args)`` logs ``fmt % (count, *args)`` at most once per ``every`` seconds;
    ``count`` is how many notes the line stands for (since the last line)."""

    def __init__(
        self, logger: logging.Logger, every: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._count = 0
        self.total = 0  # every note, logged or not

    def note(self, fmt: str, *args: object) -> bool:
        """Count one occurrence; True if this one was logged."""
        with self._lock:
            self._count += 1
            self.total += 1
            now = self._clock()
            if self._last is not None and now - self._last < self._every:
                return False
            count, self._count, self._last = self._count, 0, now
        self._log.warning(fmt, count, *args)
        return True


__all__ = ["ThrottledLog"]
