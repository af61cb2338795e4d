"""The anomaly detectors behind one ``feed`` (``DetectorSet``), the network-path detectors
and the always-alert rule (docs/monitoring.md, "Anomaly detection"). The key-use
detectors are in ``telemetry.keydetectors``; correlation and de-duplication are
``telemetry.correlate``'s.

- ``handshake-burst``: ``burst`` failed handshakes (or requests refused for their
  certificate: TLS events) from one source within ``window`` seconds;
- ``pin-mismatch``: every ``pin-mismatch`` audit event (a client refused a server whose
  key its pins do not name);
- ``lifecycle``: every disable, destroy and policy change, and every hold placed or
  released by a person: a decision on ``key.disable``/``key.destroy``/``policy.propose``/
  ``policy.activate`` (allowed or not), ``policy-propose``, an ``approval-run`` of one of
  those actions, a local key service ``disable``/``destroy``/``schedule-destroy``/
  ``min-version`` (a broker's follows its decision, which reported it), ``hold-place``/
  ``hold-release``. One actor's steps of one change on one target within ``dedupe``
  seconds (default 600: a proposal's decision and its ``policy-propose``) are one alert.

``DetectorSet`` skips the monitor's own events (actor ``modelseal-monitor``: its anomaly
events and the holds it places never feed back), remembers when it saw its first event
(``start``) and each principal's (``meta/principals``): the origins of the learning and
warm-up periods (``detectbase.Context``), and names every table for the state store as
``DETECTOR/TABLE``. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from modelseal.keys.config import ConfigError
from modelseal.telemetry.detectbase import (
    DAY,
    SEP,
    Context,
    Detection,
    Detector,
    Params,
    Row,
    Spec,
    Table,
    burst,
    principal,
)
from modelseal.telemetry.keydetectors import Exfiltration, FailureBurst, PullRate, UnwrapRate
from modelseal.telemetry.novelty import NewKey, NewSource, OffHours
from modelseal.telemetry.probes import PROBES
from modelseal.telemetry.secevents import SecurityEvent

MONITOR_ACTOR = "modelseal-monitor"
CHANGE_OPS = {"disable": "disable", "destroy": "destroy", "schedule-destroy": "destroy", "min-version": "disable"}
CHANGE_ACTIONS = {
    "key.disable": "disable",
    "key.destroy": "destroy",
    "policy.propose": "policy",
    "policy.activate": "policy",
}


def change_of(ev: SecurityEvent) -> tuple[str, str] | None:
    """(kind of change, what changed) if ``ev`` is a step of a disable, destroy, policy or
    hold change (module docstring)."""
    if ev.kind != "audit":
        return None
    op, key = ev.operation, ev.key or ""
    if op in CHANGE_OPS:  # a broker's operation follows its decision: that one reported it
        return None if (ev.actor or "").startswith("spiffe://") else (CHANGE_OPS[op], key)
    if op == "authorize" and ev.action in CHANGE_ACTIONS:
        return CHANGE_ACTIONS[ev.action or ""], ev.resource or ""
    if op == "policy-propose":
        return "policy", "Governance:policy"
    if op == "approval-run":
        action, _, what = key.partition(" ")
        return (CHANGE_ACTIONS[action], what) if action in CHANGE_ACTIONS else None
    if op in ("hold-place", "hold-release"):
        return op, key
    return None


class Lifecycle(Detector):
    SPEC = Spec("lifecycle", "warning", {"dedupe": 600.0}, {}, "every disable, destroy, policy and hold change")

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        change = change_of(ev)
        if change is None:
            return []
        kind, what = change
        who = principal(ev) or "?"
        verdict = "" if ev.outcome == "success" else f" ({ev.outcome}: {ev.result})"
        summary = f"{kind} change by {who}: {ev.operation} {what}{verdict}"
        dedupe = f"{who}{SEP}{kind}{SEP}{what}"
        return [self.found(ev, {"identity": who, "key": what, "source": ev.source or ""}, summary, None, dedupe)]


class PinMismatch(Detector):
    SPEC = Spec("pin-mismatch", "critical", {}, {}, "a client refused a server its pins do not name")

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        if ev.kind != "audit" or ev.operation != "pin-mismatch":
            return []
        who = principal(ev) or "?"
        endpoint = ev.key or "?"
        summary = f"pin mismatch: {who} was shown a certificate its pins do not name at {endpoint}"
        subject = {"identity": who, "key": endpoint, "source": ev.source or ""}
        return [self.found(ev, subject, summary, None, f"{who}{SEP}{endpoint}")]


class HandshakeBurst(Detector):
    SPEC = Spec(
        "handshake-burst",
        "warning",
        {"burst": 10, "window": 300.0, "ignore_sources": []},
        {"burst": (2.0, 100000.0), "window": (10.0, DAY)},
        "a burst of failed handshakes from one source",
    )

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        if ev.kind != "tls" or not ev.source or ev.source in self.p["ignore_sources"]:
            return []
        row: Row = self.table.get(ev.source) or {}
        fired = burst(row, ev.time, None, int(self.p.num("burst")), self.p.num("window"))
        reasons: list[str] = row.setdefault("r", [])
        if ev.result not in reasons:
            reasons.append(ev.result)
            del reasons[:-4]
        self.table.touch(ev.source, row)
        if not fired:
            return []
        n, w = int(self.p.num("burst")), self.p.num("window")
        summary = f"{n} failed handshakes from {ev.source} within {w / 60:g} min ({', '.join(reasons)})"
        row.pop("r", None)
        return [self.found(ev, {"source": ev.source, "identity": ev.actor or ""}, summary, None, ev.source)]


DETECTORS: tuple[type[Detector], ...] = (UnwrapRate, NewKey, NewSource, OffHours, FailureBurst, Exfiltration)
DETECTORS += (Lifecycle, HandshakeBurst, PinMismatch, PullRate, *PROBES)  # probes: telemetry.probes
NAMES = tuple(d.SPEC.name for d in DETECTORS)
CORRELATED = "correlated-intrusion"  # telemetry.correlate's rule; configured beside the detectors


def detector_table(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = config.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config: monitor.detectors.{name} must be a table")
    return table


class DetectorSet:
    """Every enabled detector of ``config`` (``[monitor.detectors]``: a table per detector
    name, unknown names refused) behind one ``feed``; ``take``/``load`` their state."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        config = dict(config or {})
        unknown = sorted(set(config) - set(NAMES) - {CORRELATED})
        if unknown:
            raise ConfigError(f"config: [monitor.detectors] has unknown detector(s) {', '.join(unknown)[:200]}")
        self.detectors: list[Detector] = []
        for cls in DETECTORS:
            params = Params(cls.SPEC, detector_table(config, cls.SPEC.name))
            if params["enabled"]:
                self.detectors.append(cls(params))
        self.start: float | None = None
        self._start_changed = False
        caps = [d.p.num("max_entities") for d in self.detectors]
        self.principals = Table(int(max(caps, default=10000)))  # when each was first seen

    def by_name(self, name: str) -> Detector | None:
        return next((d for d in self.detectors if d.name == name), None)

    def feed(self, ev: SecurityEvent) -> list[Detection]:
        if ev.actor == MONITOR_ACTOR:
            return []
        if self.start is None:
            self.start, self._start_changed = ev.time, True
        first = self.start
        who = principal(ev)
        if who is not None:
            row = self.principals.get(who) or {"f": ev.time}
            self.principals.touch(who, row)
            first = float(row["f"])
        ctx = Context(self.start, first)
        out: list[Detection] = []
        for d in self.detectors:
            out.extend(d.feed(ev, ctx))
        return out

    def tables(self) -> Iterable[tuple[str, Table]]:
        yield "meta/principals", self.principals
        for d in self.detectors:
            for suffix, table in d.tables.items():
                yield f"{d.name}/{suffix}", table

    def take(self) -> tuple[list[tuple[str, str, int, Row]], list[tuple[str, str]]]:
        """The rows changed since the last call (table, entity, order, row) and the evicted ones."""
        changed: list[tuple[str, str, int, Row]] = []
        gone: list[tuple[str, str]] = []
        for name, table in self.tables():
            rows, evicted = table.take()
            changed.extend((name, e, o, r) for e, (o, r) in rows.items())
            gone.extend((name, e) for e in evicted)
        if self._start_changed and self.start is not None:
            changed.append(("meta/", "start", 0, {"t": self.start}))
            self._start_changed = False
        return changed, gone

    def load(self, rows: Iterable[tuple[str, str, int, Row]]) -> None:
        by_table: dict[str, list[tuple[str, int, Row]]] = {}
        for name, entity, order, row in rows:
            if name == "meta/" and entity == "start":
                self.start = float(row["t"])
            else:
                by_table.setdefault(name, []).append((entity, order, row))
        for name, table in self.tables():
            table.load(by_table.get(name, []))


__all__ = ["CORRELATED", "DETECTORS", "MONITOR_ACTOR", "NAMES", "DetectorSet", "HandshakeBurst", "Lifecycle"]
__all__ += ["PinMismatch", "change_of", "detector_table"]
