"""Audit events and the sink they go to.

Owns the event shape (who did which key operation on what, with what result,
when) and the JSON-lines sink under ``$MODELSEAL_HOME``. Events carry key
URIs, versions and artifact ids, never key material, passphrases or
plaintext. A later release replaces the sink with a tamper-evident log; the
``AuditSink`` protocol is the seam.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from modelseal.errors import StorageError


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


@dataclass(frozen=True)
class AuditEvent:
    operation: str  # create, rotate, disable, enable, destroy, wrap, unwrap, rewrap, ...
    key: str  # key URI
    result: str  # "ok" or the error class name
    version: int | None = None
    artifact: str | None = None  # artifact id (hex), never a path's contents
    actor: str = field(default_factory=_actor)
    time: float = 0.0
    source: str | None = None  # the caller's network source (an IP address) where a server saw one
    subject: str | None = None  # whom the event is about when not its actor (an anomaly's identity)

    def fields(self) -> dict[str, Any]:
        """The event as stored: ``source`` and ``subject`` only when set, so events without
        them keep the shape (and the bytes) they had before the fields existed."""
        doc = asdict(self)
        for name in ("source", "subject"):
            if doc[name] is None:
                del doc[name]
        return doc

    def to_json(self) -> str:
        return json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None: ...


class JsonLinesSink:
    """Appends one JSON object per line, fsynced, to a 0600 file."""

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = now

    def emit(self, event: AuditEvent) -> None:
        if not event.time:
            event = replace(event, time=self._now())
        line = (event.to_json() + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot write audit log {self.path}: {e.strerror}") from None


class MemorySink:
    """Keeps events in a list (for embedding and for tests)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)
