"""``NetEventRecorder``: the server's failed handshakes into the shared ``netevents`` table,
where the monitor reads them (docs/monitoring.md, "Anomaly detection").

Registered as a handshake observer (``server.handshakes.OBSERVERS``) in every worker: it is
called on the event loop for every handshake, so ``record`` only appends a failed one to a
bounded queue (``max_queue``; beyond it the oldest are dropped and counted) and returns;
one daemon thread writes the queue every ``every`` seconds in one transaction
(``DetectState.record_netevents``) and, once an hour, deletes the rows older than
``retention`` (7 days). A write that fails keeps the rows for the next try (still
bounded) and logs once a minute (``ThrottledLog``). ``record`` never raises. It takes any
object with the ``Handshake`` attributes (time, source, ok, reason, actor): telemetry does
not import the server. Values are cut to bounded lengths; a reason that is not a short
lowercase token is recorded as ``other``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from modelseal.telemetry.detectstate import RETENTION, DetectState
from modelseal.telemetry.logthrottle import ThrottledLog

log = logging.getLogger("modelseal.telemetry")

MAX_QUEUE = 10_000
EVERY = 1.0
PRUNE_EVERY = 3600.0
_REASON = re.compile(r"[a-z][a-z0-9-]{0,31}")


class HandshakeLike(Protocol):
    """The attributes of ``server.handshakes.Handshake`` the recorder reads."""

    @property
    def time(self) -> float: ...

    @property
    def source(self) -> str: ...

    @property
    def ok(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def actor(self) -> str | None: ...


class NetEventRecorder:
    """See the module docstring. ``flush()`` writes what is queued now (tests, shutdown)."""

    def __init__(
        self,
        state: DetectState,
        every: float = EVERY,
        max_queue: int = MAX_QUEUE,
        retention: float = RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state, self.every, self.retention, self.clock = state, every, retention, clock
        self._queue: deque[tuple[int, tuple[float, str, str, str | None]]] = deque(maxlen=max_queue)
        self._n = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pruned = 0.0
        self.dropped = 0
        self._failures = ThrottledLog(log)

    def record(self, hs: HandshakeLike) -> None:
        try:
            if hs.ok:
                return
            reason = hs.reason if isinstance(hs.reason, str) and _REASON.fullmatch(hs.reason) else "other"
            actor = hs.actor[:512] if isinstance(hs.actor, str) and hs.actor else None
            row = (float(hs.time), str(hs.source)[:64], reason, actor)
            with self._lock:
                if len(self._queue) == self._queue.maxlen:
                    self.dropped += 1
                self._n += 1
                self._queue.append((self._n, row))
                if self._thread is None and not self._stop:
                    self._thread = threading.Thread(target=self._run, name="netevents", daemon=True)
                    self._thread.start()
        except Exception as e:  # an observer never fails a connection
            self._failures.note("%d handshake(s) not recorded (latest: %s)", type(e).__name__)

    def flush(self) -> int:
        """Write the queued rows; how many were written (0 on failure: they stay queued)."""
        with self._lock:
            queued = list(self._queue)
        rows = [row for _, row in queued]
        if rows:
            try:
                self.state.record_netevents(rows)
            except Exception as e:
                self._failures.note("%d write(s) of failed handshakes failed (latest: %s)", type(e).__name__)
                return 0
            last = queued[-1][0]
            with self._lock:
                while self._queue and self._queue[0][0] <= last:
                    self._queue.popleft()
        now = self.clock()
        if now - self._pruned >= PRUNE_EVERY:
            try:
                self.state.prune_netevents(now, self.retention)
                self._pruned = now
            except Exception as e:
                self._failures.note("%d prune(s) of old handshakes failed (latest: %s)", type(e).__name__)
        return len(rows)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.every)
            self._wake.clear()
            self.flush()
            if self._stop:
                return

    def close(self) -> None:
        """Write what is queued and stop the thread."""
        with self._lock:
            self._stop = True
            thread = self._thread
        if thread is not None:
            self._wake.set()
            thread.join(timeout=10)
        else:
            self.flush()


__all__ = ["EVERY", "MAX_QUEUE", "HandshakeLike", "NetEventRecorder"]
