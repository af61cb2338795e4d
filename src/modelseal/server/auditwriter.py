"""The decider's audit events, written off the request path: ``AuditWriter`` is an
``AuditSink`` that queues each event (stamped with the time of its decision) and has one
thread per process append them to the real sink, in batches (``emit_many`` when the sink
has it, else one ``emit`` each).

Why: the tamper-evident log (``audit.log.MerkleAuditLog``) pays a transaction and two
fsyncs per event, some 20-30 ms here; a registry serving every blob request through a
decision cannot wait for that on each one. What it keeps: every decision is still recorded,
in order, with its own time; the queue is bounded (``MAX_QUEUE``), so a log that falls
behind slows decisions down (back-pressure) instead of dropping events; and a log that
cannot be written refuses every later decision (``emit`` raises ``StorageError``: the
decider answers 503) until a retry of the failed batch succeeds. On shutdown the queue is
written out (``close``, bounded by ``timeout``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.errors import ModelsealError, StorageError

log = logging.getLogger("modelseal.server")

MAX_QUEUE = 10_000
BATCH = 256
RETRY_AFTER = 1.0


class AuditWriter:
    """Queue events for ``sink``; one daemon thread writes them (see the module docstring)."""

    def __init__(self, sink: AuditSink, max_queue: int = MAX_QUEUE, batch: int = BATCH) -> None:
        self.sink, self.max_queue, self.batch = sink, max_queue, batch
        self._queue: deque[AuditEvent] = deque()
        self._cond = threading.Condition()
        self._failed: str | None = None
        self._busy = False
        self._closing = False
        self._thread: threading.Thread | None = None

    def emit(self, event: AuditEvent) -> None:
        stamped = event if event.time else replace(event, time=time.time())
        with self._cond:
            if self._failed is not None:
                raise StorageError(f"the audit log cannot be written ({self._failed})")
            if self._closing:
                raise StorageError("the audit log is closing")
            while len(self._queue) >= self.max_queue:
                self._cond.wait(1.0)
                if self._failed is not None:
                    raise StorageError(f"the audit log cannot be written ({self._failed})")
            self._queue.append(stamped)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _write(self, events: list[AuditEvent]) -> None:
        many = getattr(self.sink, "emit_many", None)
        if callable(many):
            many(events)
            return
        for e in events:
            self.sink.emit(e)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                events = [self._queue[i] for i in range(min(self.batch, len(self._queue)))]
                self._busy = True
            try:
                self._write(events)
            except ModelsealError as e:
                with self._cond:
                    self._busy = False
                    if self._failed is None:
                        log.error("the audit log cannot be written; refusing decisions: %s", e)
                    self._failed = str(e)[:200]
                    self._cond.notify_all()
                    if self._closing:
                        log.error("%d audit events were not written at shutdown", len(self._queue))
                        return
                time.sleep(RETRY_AFTER)
                continue
            with self._cond:
                for _ in events:  # only now: a failed batch stays queued, to be retried
                    self._queue.popleft()
                self._busy = False
                if self._failed is not None:
                    log.warning("the audit log is writable again")
                    self._failed = None
                self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event is written (True), or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or (self._failed is not None and self._closing):
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if not self.flush(timeout):
            log.error("audit events still queued at shutdown: %d", len(self._queue))


__all__ = ["MAX_QUEUE", "AuditWriter"]
