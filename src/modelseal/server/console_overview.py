"""The console's Overview page, ``/ui/`` (docs/console.md): one widget per question, each
decided by its own Cedar action and, when denied, replaced by a one-line "not allowed for
you" naming the action:

- *open alerts*: the anomaly alerts of the last ``alerts_api.MAX_WINDOW`` seconds, as
  ``GET /modelseal/v1/alerts`` lists them (``audit.read`` on ``Audit:alerts``), from the
  verified entries of the audit log (``console_audit.AuditView``), each read once by the
  worker's ``console_usage.Alerts`` (a view reads only what was appended since the last);
- *certificates expiring soonest* (``cert.list`` on ``Certificate:*``, ``console_certs``);
- *keys past or near their cryptoperiod*, or due for rotation, or with no active version
  (``key.list``: on ``Key:*`` of the caller's environment for the widget, then per
  environment as the Keys page lists them, ``console_keys``);
- *protection coverage*: the registry's artifacts by protection state as the server's own
  periodic pass last found them (``telemetry.statepass``, part ``artifacts``: the
  ``modelseal_artifacts{state}`` figures of the metrics snapshot, ``telemetry.collect``);
  "no scan recorded" when no pass published them;
- *last backup* and *last drill*: the newest signed record under
  ``$MODELSEAL_HOME/evidence/backups/`` and ``.../drills/`` (``recovery.create``,
  ``recovery.records``), its signature checked against the audit log's trusted keys
  (``evidence.records.signature_state``); "none recorded" when there is none. Both are
  evidence: decided ``evidence.read`` on ``Audit:evidence``, as the Evidence page is, and so
  is the coverage figure (the metrics route's own ``metrics.read`` is a scraper's role).

A record is found by its name (``KIND-YYYYMMDDTHHMMSSZ-HEX.json``: the newest name is the
newest record), opened relative to its folder without following a link, a regular file of
one link and at most ``evidence.records.MAX_RECORD`` bytes (``evidence.records.read_record``);
only a few known fields of it are shown, each cut.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from modelseal.evidence.records import RecordRefused, open_record_dir, read_record, record_format, signature_state
from modelseal.governance.model import Resource
from modelseal.server import alerts_api, console_certs, console_keys, console_svg
from modelseal.server.console_audit import AuditView
from modelseal.server.console_page import PREFIX, allowed, cut, deps, nav, render, resource, run, utc
from modelseal.server.console_usage import ALERTS, Alerts
from modelseal.telemetry import collect, metrics
from modelseal.telemetry.statepass import ARTIFACT_STATES
from modelseal.util.bounded import json_loads

SCAN_ROWS = 20_000
SHOWN = 5
RECORD_NAME = re.compile(r"(backup|drill)-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}\.json")
ATTENTION = (console_keys.PAST, console_keys.NEAR, console_keys.NONE, console_keys.DUE)


@dataclass
class Widget:
    """One widget: whether the identity may see it (``action`` decided it), whether this
    server has what it reads, and what it shows."""

    action: str
    allowed: bool
    available: bool = True
    data: dict[str, Any] = field(default_factory=dict)


# -- alerts ------------------------------------------------------------------------------------


def open_alerts(source: AuditView | Alerts, now: float, scan: int = SCAN_ROWS) -> dict[str, Any]:
    """The alerts of the last ``alerts_api.MAX_WINDOW`` seconds: the newest ``SHOWN``, the
    count by severity, and whether the log verified. ``source``: the page's ``Alerts``
    (``server.console_usage``, brought up to date here: only new entries are read), or an
    ``AuditView`` read once (its newest ``scan`` entries)."""
    tail = source if isinstance(source, Alerts) else Alerts(source, per_view=scan, keep=alerts_api.MAX_ALERTS)
    tail.update()
    status, start = tail.view.status(), now - alerts_api.MAX_WINDOW
    alerts = [a for a in map(alert_of_row, tail.since(start)) if a is not None][: alerts_api.MAX_ALERTS]
    severities: dict[str, int] = {}
    for a in alerts:
        severities[str(a["severity"])] = severities.get(str(a["severity"]), 0) + 1
    return {
        "count": len(alerts),
        "newest": alerts[:SHOWN],
        "severities": sorted(severities.items()),
        "verified": status.ok,
        "complete": len(alerts) >= alerts_api.MAX_ALERTS or tail.reaches(start),
        "read": tail.read(),
    }


def alert_of_row(e: dict[str, Any]) -> dict[str, str] | None:
    """``alerts_api.alert_of`` of a verified entry, as text for the page."""
    a = alerts_api.alert_of(e)
    if a is None:
        return None
    out = {k: "" if v is None else cut(v) for k, v in a.items()}
    out["time"] = utc(a["time"])
    return out


# -- coverage ----------------------------------------------------------------------------------


def coverage(families: list[collect.Family]) -> dict[str, Any] | None:
    """The artifacts by protection state of the last published pass, the share sealed and
    signed, and when the pass ran; None when no pass published them."""
    by_name = {f.name: f for f in families}
    art = by_name.get("modelseal_artifacts")
    if art is None or art.labels != ("state",):
        return None
    counts = {s: 0 for s in ARTIFACT_STATES}
    for (state,), value in art.samples:
        if state in counts:
            counts[state] = int(value)
    when = 0.0
    last = by_name.get("modelseal_state_pass_last_success_timestamp_seconds")
    for (part,), value in last.samples if last is not None and last.labels == ("part",) else ():
        if part == "artifacts":
            when = value
    total = sum(counts.values())
    signed = counts["sealed-signed"]
    return {
        "counts": list(counts.items()),
        "total": total,
        "signed": signed,
        "when": utc(when),
        "meter": console_svg.meter("Artifacts sealed and signed", signed, total),
    }


def read_coverage() -> dict[str, Any] | None:
    return coverage(collect.read_snapshot(metrics.multiprocess_dir()))


# -- backup and drill records --------------------------------------------------------------


def _bad(why: str) -> ValueError:
    return ValueError(why)


def _fields(kind: str, body: dict[str, Any]) -> dict[str, str]:
    if kind == "backups":
        parts = body.get("parts")
        return {
            "when": utc(body.get("created")),
            "id": cut(body.get("id", ""), 80),
            "env": cut(body.get("env") or "(all)", 64),
            "sequence": cut(body.get("sequence", ""), 20),
            "result": cut(body.get("result", ""), 60),
            "parts": str(len(parts)) if isinstance(parts, list) else "",
        }
    rto, backup = body.get("rto"), body.get("backup")
    rto = rto if isinstance(rto, dict) else {}
    backup = backup if isinstance(backup, dict) else {}
    failures = body.get("failures")
    return {
        "when": utc(body.get("started")),
        "id": cut(backup.get("id", ""), 80),
        "result": cut(body.get("result", ""), 60),
        "rto": cut(rto.get("seconds", ""), 20),
        "rto_ok": "yes" if rto.get("ok") is True else "no",
        "failures": str(len(failures)) if isinstance(failures, list) else "",
    }


def _problem(why: str) -> dict[str, Any]:
    return {"problem": why, "count": 0, "name": "", "signature": "", "fields": {}}


def last_record(home: Path, kind: str, trusted: dict[str, Any]) -> dict[str, Any] | None:
    """The newest record of ``kind`` (``backups`` or ``drills``) under ``home/evidence``:
    its shown fields, its signature state and how many records there are; None: none."""
    try:
        top = open_record_dir(home / "evidence")
        if top is None:
            return None
        try:
            fd = open_record_dir(kind, top)
        finally:
            os.close(top)
        if fd is None:
            return None
        try:
            names = sorted(n for n in os.listdir(fd) if RECORD_NAME.fullmatch(n))
            if not names:
                return None
            data = read_record(fd, names[-1])
        finally:
            os.close(fd)
    except RecordRefused as e:
        return _problem(f"evidence/{kind}: {e}")
    except OSError as e:
        return _problem(f"evidence/{kind}: cannot be listed: {e.strerror}")
    out: dict[str, Any] = {"count": len(names), "name": names[-1], "problem": "", "fields": {}}
    try:
        doc = json_loads(data, max_depth=16, max_values=1_000_000, error=_bad)
    except ValueError:
        doc = None
    if record_format(doc, kind) is None:
        out |= {"problem": "not a record of its kind: not shown", "signature": ""}
        return out
    out["signature"] = signature_state(doc, trusted)
    out["fields"] = _fields(kind, doc["body"])
    return out


def recovery_records(home: Path, audit: Any) -> dict[str, Any]:
    """The last backup and the last drill records (``last_record``) under the audit log's keys."""
    keys = getattr(audit, "trusted_keys", None)
    trusted = keys() if callable(keys) else {}
    return {"backup": last_record(home, "backups", trusted), "drill": last_record(home, "drills", trusted)}


# -- the page ---------------------------------------------------------------------------------


class _Decisions:
    """Each distinct (action, resource) of the page decided once."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.seen: dict[tuple[str, str, str], bool] = {}

    async def ask(self, action: str, res: Resource) -> bool:
        k = (action, res.type, res.id)
        if k not in self.seen:
            self.seen[k] = await allowed(self.request, action, res)
        return self.seen[k]


async def _alerts(request: web.Request, ask: _Decisions, now: float) -> Widget:
    w = Widget("audit.read", await ask.ask("audit.read", resource(request, "Audit", "alerts")))
    tail = request.app.get(ALERTS)
    if w.allowed:
        w.available = tail is not None
        if tail is not None:
            w.data = await run(request, open_alerts, tail, now)
    return w


async def _certs(request: web.Request, ask: _Decisions, now: float) -> Widget:
    w = Widget("cert.list", await ask.ask("cert.list", console_certs.cert_resource(request)))
    folder = console_certs.ca_folder(request)
    if w.allowed:
        w.available = folder is not None
        if folder is not None:
            soonest, counts = await run(request, console_certs.expiring_soonest, folder, now, SHOWN)
            w.data = {"soonest": soonest, "counts": counts}
    return w


async def _keys(request: web.Request, ask: _Decisions, now: float) -> Widget:
    w = Widget("key.list", await ask.ask("key.list", resource(request, "Key", "*")))
    d = deps(request)
    if w.allowed:
        w.available = console_keys.configured(request)
    if w.allowed and w.available:
        entries, _more = await console_keys.listed(request)
        p = await run(request, console_keys.periods, d.home)
        rows = await run(request, console_keys.describe_rows, d.svc, entries, p, now)
        flagged = [r for r in rows if r.status in ATTENTION]
        flagged.sort(key=lambda r: (ATTENTION.index(r.status), -(r.age_days or 0.0), r.name))
        w.data = {"flagged": flagged[: SHOWN * 2], "count": len(flagged), "listed": len(rows), "periods": p}
    return w


async def overview_page(request: web.Request) -> web.Response:
    """``GET /ui/``: the widgets the identity may see."""
    ask = _Decisions(request)
    now = time.time()
    evidence = await ask.ask("evidence.read", resource(request, "Audit", "evidence"))
    cover = Widget("evidence.read", evidence)
    recovery = Widget("evidence.read", evidence)
    if evidence:
        cover.data = {"coverage": await run(request, read_coverage)}
        recovery.data = await run(request, recovery_records, deps(request).home, deps(request).audit)
    return render(
        request,
        "overview.html",
        title="Overview",
        alerts=await _alerts(request, ask, now),
        certs=await _certs(request, ask, now),
        keys=await _keys(request, ask, now),
        coverage=cover,
        recovery=recovery,
        window_hours=int(alerts_api.MAX_WINDOW // 3600),
        near_days=console_keys.NEAR_DAYS,
    )


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/`` (exactly) and its place in the navigation."""
    nav(f"{PREFIX}/", "Overview")
    app.router.add_get(f"{PREFIX}/", overview_page)


__all__ = [
    "SCAN_ROWS",
    "Widget",
    "add_routes",
    "alert_of_row",
    "coverage",
    "last_record",
    "open_alerts",
    "overview_page",
    "recovery_records",
]
