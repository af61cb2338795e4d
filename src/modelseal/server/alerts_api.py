"""``GET /modelseal/v1/alerts?since=UNIX``: the recent anomaly alerts, as the audit log records them
(docs/controls.md, docs/monitoring.md).

The monitor (``telemetry.monitor``) writes one audit event per detection: operation
``anomaly``, key ``anomaly:DETECTOR``, result ``alert:SEVERITY``, actor ``modelseal-monitor``.
This route lists those events from the server's own audit log, read back through
``MerkleAuditLog.verified_events``: only entries that verify are shown (a row written into the
database behind the log's back is never presented as an alert), and the answer says whether
the whole log verified (``verified``; else ``problem``, the verification's one-line reason).
Decided as ``audit.read`` on ``Resource("Audit", "alerts", {"env": ENV})`` (role
``auditor``). Bounded: at most the last ``MAX_ALERTS`` alerts of the last ``MAX_WINDOW``
seconds (``since`` older than that is moved up to it); every field is cut to a short
printable string. Reading a log verifies it whole, so each worker reads it at most once per
``CACHE_SECONDS``, one read at a time, in a thread.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from modelseal.errors import ModelsealError
from modelseal.governance.model import Resource
from modelseal.server import authz

MAX_WINDOW = 86400.0  # 24 h
MAX_ALERTS = 1000
CACHE_SECONDS = 2.0
_FIELD = 200


class ReadableLog(Protocol):
    """What this route needs of the audit log (``audit.log.MerkleAuditLog``)."""

    def verified_events(
        self, key: str | None = None, since: float | None = None
    ) -> tuple[list[dict[str, Any]], Any]: ...


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    cut = value[:_FIELD]
    return cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")[:_FIELD]


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


def alert_of(doc: dict[str, Any]) -> dict[str, object] | None:
    """The alert of one audit event (a verified entry), or None when it is not an anomaly."""
    key, result = doc.get("key"), doc.get("result")
    if doc.get("operation") != "anomaly" or not isinstance(key, str) or not key.startswith("anomaly:"):
        return None
    severity = result.removeprefix("alert:") if isinstance(result, str) and result.startswith("alert:") else ""
    entry = doc.get("entry")
    return {
        "entry": entry if isinstance(entry, int) and not isinstance(entry, bool) else None,
        "time": _number(doc.get("time")),
        "detector": _text(key.removeprefix("anomaly:")),
        "severity": _text(severity),
        "actor": _text(doc.get("actor")),
        "source": _text(doc.get("source")),
        "subject": _text(doc.get("subject")),
        "artifact": _text(doc.get("artifact")),
    }


def _ok(verification: object) -> bool:
    return bool(getattr(verification, "ok", False))


class AlertReader:
    """The anomaly alerts of the last ``MAX_WINDOW`` seconds of ``log``, re-read at most every
    ``cache_seconds`` (thread-safe; one read at a time)."""

    def __init__(self, log: ReadableLog, cache_seconds: float = CACHE_SECONDS, now: Callable[[], float] = time.time):
        self.log, self.cache_seconds, self.now = log, cache_seconds, now
        self._lock = threading.Lock()
        self._read_at = -math.inf
        self._alerts: list[dict[str, object]] = []
        self._verified = False
        self._reason = ""

    def recent(self, since: float) -> tuple[list[dict[str, object]], bool, str]:
        """The alerts at or after ``since`` (oldest first, the last ``MAX_ALERTS``), whether
        the log verified whole, and why not ("" when it did)."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.cache_seconds:
                events, verification = self.log.verified_events(since=self.now() - MAX_WINDOW)
                if not _ok(verification) and getattr(verification, "first_bad", 0) is None:
                    # every entry verified, only the check of this host's last write did not: a
                    # writer of another process may have appended between the two reads
                    events, verification = self.log.verified_events(since=self.now() - MAX_WINDOW)
                alerts = [a for a in map(alert_of, events) if a is not None]
                self._alerts, self._verified = alerts[-MAX_ALERTS:], _ok(verification)
                self._reason = "" if self._verified else _text(str(getattr(verification, "reason", ""))) or "?"
                self._read_at = time.monotonic()
            alerts, verified, reason = self._alerts, self._verified, self._reason
        return [a for a in alerts if _number(a["time"]) >= since], verified, reason


READER: web.AppKey[AlertReader] = web.AppKey("alerts_reader", AlertReader)


def _since(request: web.Request, now: float) -> float:
    text = request.query.get("since", "")
    floor = now - MAX_WINDOW
    if not text:
        return floor
    try:
        value = float(text) if len(text) <= 20 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise authz.Refusal(400, "INVALID", "since must be a POSIX time in seconds")
    return max(value, floor)


async def list_alerts(request: web.Request) -> web.Response:
    """``GET /modelseal/v1/alerts``: the alerts at or after ``since``, for an auditor."""
    decider = request.app.get(authz.AUTHZ)
    env = decider.env if decider is not None else ""
    await authz.authorize(request, "audit.read", Resource("Audit", "alerts", {"env": env}))
    reader = request.app[READER]
    since = _since(request, reader.now())
    try:
        alerts, verified, reason = await asyncio.get_running_loop().run_in_executor(None, reader.recent, since)
    except ModelsealError:
        raise authz.Refusal(503, "UNAVAILABLE", "the audit log cannot be read now; retry later") from None
    body: dict[str, object] = {"alerts": alerts, "since": since, "verified": verified}
    if not verified:
        body["problem"] = reason
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application, log: object) -> None:
    """Mount the route over ``log`` (the server's audit log); a sink that cannot be read back
    (no ``verified_events``) answers 503."""
    if callable(getattr(log, "verified_events", None)):
        app[READER] = AlertReader(log)  # type: ignore[arg-type]
        app.router.add_get("/modelseal/v1/alerts", list_alerts)
        return

    async def unreadable(request: web.Request) -> web.Response:
        await authz.authorize(request, "audit.read", Resource("Audit", "alerts", {"env": request.app[authz.AUTHZ].env}))
        raise authz.Refusal(503, "UNAVAILABLE", "this server's audit log cannot be read back")

    app.router.add_get("/modelseal/v1/alerts", unreadable)


__all__ = ["MAX_ALERTS", "MAX_WINDOW", "READER", "AlertReader", "add_routes", "alert_of", "list_alerts"]
