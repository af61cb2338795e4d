"""What the console's pages keep of the verified audit log, read once per entry: key use per
UTC day (the Keys page's chart, ``server.console_keys``) and the recent alerts (the
Overview's, ``server.console_overview``).

``Tail`` reads a ``console_audit.AuditView`` incrementally: each page view reads only the
entries appended since the last one (at most ``per_view``, oldest first, so what was read
has no hole); the first view of a log starts ``per_view`` entries before its end, and
``reaches`` says whether what was read goes back to a given time. ``UsageIndex`` counts
key operations per (key as the event names it, series, UTC day), dropping days older than
``KEEP_DAYS``; ``Alerts`` keeps the anomaly alerts of the last day. Only entries that
verify are read (the view's check).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from modelseal.keys.service import LIFECYCLE_OPS
from modelseal.server.alerts_api import MAX_ALERTS
from modelseal.server.console_audit import VIEW, AuditView

DAY = 86400.0
KEEP_DAYS = 120  # more than the page's longest window (console_keys.MAX_DAYS)
PER_VIEW = 20_000
SERIES = ("wrap", "unwrap", "rewrap", "rotate", "lifecycle", "failed")
USES = frozenset({"wrap", "unwrap", "rewrap", "generate"}) | LIFECYCLE_OPS


def series_of(e: dict[str, Any]) -> str | None:
    """The chart series an audit event counts in, or None (not a key operation)."""
    op = e.get("operation")
    if op not in USES:
        return None
    if e.get("result") != "ok":
        return "failed"
    if op in ("wrap", "unwrap", "rewrap", "rotate"):
        return str(op)
    return "lifecycle" if op in LIFECYCLE_OPS else "wrap"  # generate makes and wraps a data key


class Tail:
    """The incremental reader (module docstring); ``take`` is called once per new verified
    event, under the lock; thread-safe."""

    def __init__(self, view: AuditView, per_view: int = PER_VIEW) -> None:
        self.view, self.per_view = view, per_view
        self.upto = 0  # the last entry read
        self.floor = -1  # entries up to this one are not read (-1: not started)
        self.floor_time = -math.inf  # the time of entry ``floor`` (-inf: the log's start)
        self._lock = threading.Lock()

    def take(self, e: dict[str, Any]) -> None:
        raise NotImplementedError

    def forget(self) -> None:
        """Drop what was kept (the log was replaced)."""

    def update(self) -> bool:
        """Read the entries appended since the last update (at most ``per_view``); whether
        every entry of the log is read now."""
        with self._lock:
            size = self.view.status().size
            if size < self.upto:  # another log than the one read: start again
                self.upto, self.floor = 0, -1
                self.forget()
            if self.floor < 0:
                self.floor = self.upto = max(0, size - self.per_view)
                self.floor_time = -math.inf if self.floor == 0 else self._time_of(self.floor)
            if size > self.upto:
                events, last = self.view.after(self.upto, min(size - self.upto, self.per_view))
                for e in events:
                    self.take(e)
                self.upto = max(self.upto, last)
            return self.upto >= size

    def _time_of(self, entry: int) -> float:
        events, _ = self.view.after(entry - 1, 1)
        t = events[0].get("time") if events else None
        return float(t) if isinstance(t, int | float) else math.inf

    def reaches(self, start: float) -> bool:
        """Whether the entries read cover every entry since ``start``."""
        return self.floor_time < start

    def read(self) -> tuple[int, int]:
        """The first and last entry read ((0, 0): none)."""
        return (self.floor + 1, self.upto) if self.upto > self.floor >= 0 else (0, 0)


class UsageIndex(Tail):
    """Key operations per (key as the event names it, series, UTC day)."""

    def __init__(self, view: AuditView, per_view: int = PER_VIEW) -> None:
        super().__init__(view, per_view)
        self.counts: dict[tuple[str, str, int], int] = {}
        self._prune_at = 50_000

    def forget(self) -> None:
        self.counts = {}

    def take(self, e: dict[str, Any]) -> None:
        self._count(e)
        if len(self.counts) > self._prune_at:  # old days dropped; amortised, never per entry
            self._prune()
            self._prune_at = max(50_000, 2 * len(self.counts))

    def _count(self, e: dict[str, Any]) -> None:
        series, t, key = series_of(e), e.get("time"), e.get("key")
        if series is None or not isinstance(t, int | float) or not isinstance(key, str):
            return
        k = (key, series, int(t // DAY))
        self.counts[k] = self.counts.get(k, 0) + 1

    def _prune(self) -> None:
        if not self.counts:
            return
        newest = max(day for _, _, day in self.counts)
        self.counts = {k: n for k, n in self.counts.items() if k[2] >= newest - KEEP_DAYS}

    def per_day(self, owner: Callable[[str], str | None], start: float, days: int) -> dict[str, dict[str, list[int]]]:
        """Counts per owner (``owner``: the name a key spelling belongs to, or None), series and
        day, for the ``days`` UTC days from ``start`` (a day's start)."""
        first = int(start // DAY)
        out: dict[str, dict[str, list[int]]] = {}
        with self._lock:
            items = list(self.counts.items())
        for (key, series, day), n in items:
            i = day - first
            name = owner(key) if 0 <= i < days else None
            if name is None:
                continue
            row = out.setdefault(name, {s: [0] * days for s in SERIES})
            row[series][i] += n
        return out


class Alerts(Tail):
    """The anomaly alerts (``operation == "anomaly"``) of the last ``window`` seconds, at most
    ``keep``, oldest first."""

    def __init__(self, view: AuditView, per_view: int = PER_VIEW, window: float = DAY, keep: int = 1000) -> None:
        super().__init__(view, per_view)
        self.window, self.keep = window, keep
        self.events: list[dict[str, Any]] = []

    def forget(self) -> None:
        self.events = []

    def take(self, e: dict[str, Any]) -> None:
        if e.get("operation") != "anomaly" or not isinstance(e.get("time"), int | float):
            return
        self.events.append(e)
        if len(self.events) > 2 * self.keep:
            self.events = self.events[-self.keep :]

    def since(self, start: float) -> list[dict[str, Any]]:
        """The kept alerts at or after ``start``, newest first (at most ``keep``)."""
        with self._lock:
            self.events = [e for e in self.events if float(e["time"]) >= start - self.window][-self.keep :]
            return [e for e in reversed(self.events) if float(e["time"]) >= start][: self.keep]


INDEX: web.AppKey[UsageIndex] = web.AppKey("console_usage", UsageIndex)
ALERTS: web.AppKey[Alerts] = web.AppKey("console_alerts", Alerts)


def install(app: web.Application, log: object) -> None:
    """The worker's one verified view of the audit log ``log`` (``console_audit.VIEW``, the
    Audit log page's) and the readers over it (``INDEX``, ``ALERTS``), once; nothing when
    ``log`` is not a Merkle log (the pages then say the log is not available)."""
    if VIEW in app or log is None or not AuditView.readable(log):
        return
    view = AuditView(log)
    app[VIEW], app[INDEX], app[ALERTS] = view, UsageIndex(view), Alerts(view, keep=MAX_ALERTS)


__all__ = ["ALERTS", "INDEX", "PER_VIEW", "SERIES", "USES", "Alerts", "Tail", "UsageIndex", "install", "series_of"]
