"""Key use per UTC day from the verified audit log, counted once per entry (the Keys page's
chart, ``server.console_keys``).

``UsageIndex`` keeps, per worker, the number of key operations per (key as the event names
it, series, UTC day) of the entries of a ``console_audit.AuditView`` it has read, and the
last entry it counted. Each page view reads only the entries appended since (at most
``per_view``, oldest first, so what it counted has no hole), instead of every entry of the
window again: the first view of a log starts ``per_view`` entries before its end, and the
index says whether what it has counted reaches back to a given time. Only entries that
verify are counted (the view's check). Days older than ``KEEP_DAYS`` are dropped.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from modelseal.keys.service import LIFECYCLE_OPS
from modelseal.server.console_audit import AuditView

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


class UsageIndex:
    """The counts of one audit view (module docstring); thread-safe."""

    def __init__(self, view: AuditView, per_view: int = PER_VIEW) -> None:
        self.view, self.per_view = view, per_view
        self.upto = 0  # the last entry counted
        self.floor = -1  # entries up to this one are not counted (-1: not started)
        self.floor_time = -math.inf  # the time of entry ``floor`` (-inf: the log's start)
        self.counts: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()

    def update(self) -> bool:
        """Count the entries appended since the last update (at most ``per_view``); whether
        every entry of the log is counted now."""
        with self._lock:
            size = self.view.status().size
            if size < self.upto:  # another log than the one counted: start again
                self.upto, self.floor, self.counts = 0, -1, {}
            if self.floor < 0:
                self.floor = self.upto = max(0, size - self.per_view)
                self.floor_time = -math.inf if self.floor == 0 else self._time_of(self.floor)
            if size > self.upto:
                events, last = self.view.after(self.upto, min(size - self.upto, self.per_view))
                for e in events:
                    self._count(e)
                self.upto = max(self.upto, last)
                self._prune()
            return self.upto >= size

    def _time_of(self, entry: int) -> float:
        events, _ = self.view.after(entry - 1, 1)
        t = events[0].get("time") if events else None
        return float(t) if isinstance(t, int | float) else math.inf

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
        if len(self.counts) > 50_000 or min(day for _, _, day in self.counts) < newest - KEEP_DAYS:
            self.counts = {k: n for k, n in self.counts.items() if k[2] >= newest - KEEP_DAYS}

    def reaches(self, start: float) -> bool:
        """Whether the counted entries cover every entry since ``start``."""
        return self.floor_time < start

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


INDEX: web.AppKey[UsageIndex] = web.AppKey("console_usage", UsageIndex)

__all__ = ["INDEX", "PER_VIEW", "SERIES", "USES", "UsageIndex", "series_of"]
