"""Group commit over one audit log: concurrent emitters share one append transaction.

A server answering many requests at once would otherwise pay one commit (and one fsync of
this host's record of its last write) per event. ``GroupCommit.emit`` still returns only
once its own event is in the log, or raises what the append raised: nothing is answered
before it is recorded. The first emitter to find no append in progress leads: it appends
everything queued so far with ``emit_many``, then whatever queued meanwhile, until the
queue is empty; the others wait for their batch. Within one process (the log's own lock
serialises processes' appends through the store).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from modelseal.audit.events import AuditEvent


class BatchLog(Protocol):
    def emit_many(self, events: Sequence[AuditEvent]) -> None: ...


class _Waiter:
    __slots__ = ("done", "error", "event")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.done = threading.Event()
        self.error: BaseException | None = None


class GroupCommit:
    """An ``AuditSink`` over a log with ``emit_many``; ``ready`` is passed through."""

    def __init__(self, log: BatchLog, max_batch: int = 512) -> None:
        self.log = log
        self._max = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._leading = False

    def ready(self) -> None:
        ready = getattr(self.log, "ready", None)
        if callable(ready):
            ready()

    def emit(self, event: AuditEvent) -> None:
        me = _Waiter(event)
        with self._lock:
            self._queue.append(me)
            lead = not self._leading
            self._leading = True
        if lead:
            self._lead()
        me.done.wait()
        if me.error is not None:
            raise me.error

    def _lead(self) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
                if not batch:
                    self._leading = False
                    return
            error: BaseException | None = None
            try:
                self.log.emit_many([w.event for w in batch])
            except BaseException as e:  # handed to every waiter of this batch, the leader's own included
                error = e
            for w in batch:
                w.error = error
                w.done.set()


__all__ = ["BatchLog", "GroupCommit"]
