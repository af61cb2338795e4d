"""Correlation across the timeline, and one alert per incident (docs/monitoring.md,
"Correlation").

The audit log (key uses, decisions) and the server's TLS events are one timeline keyed by
identity and source. ``Pipeline`` feeds it to the detectors (``telemetry.detectors``), runs
the correlation rules over it, and de-duplicates what comes out: one detection per
(detector, incident) per the detector's ``dedupe`` seconds.

The rule ``correlated-intrusion``: at least ``min_failures`` failed handshakes from a
source, then within ``within`` seconds an allowed decision on one of ``actions`` (a pull,
an unwrap) by an identity never seen allowed at that source before. That is one critical
alert, and the separate ``handshake-burst`` of that source and the ``new-source`` and
``new-key`` detections of that identity for the same event are not reported: a
``handshake-burst`` waits ``hold`` seconds (default: ``within``) before it is reported, so
that a pull that follows can still fold it into the incident; both are then de-duplicated
for their window as if they had been sent.

State (every table JSON, like the detectors'): per source the recent failure times and
the identities allowed there (``correlated-intrusion/src``), the held detections
(``pending/``), and the last report per incident (``dedupe/``). Pure: no I/O, no clock
(``flush(now)`` releases held detections when no event moves time on).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from modelseal.telemetry.detectbase import COMMON, DAY, SEP, Detection, Params, Row, Spec, Table, principal, remember
from modelseal.telemetry.detectors import CORRELATED, MONITOR_ACTOR, DetectorSet, detector_table
from modelseal.telemetry.secevents import SecurityEvent

HELD = ("handshake-burst",)  # reported after ``hold`` unless an intrusion folds them in
FOLDED = ("new-source", "new-key")  # of the intruding identity, at the same event
MAX_PENDING = 10000

SPEC = Spec(
    CORRELATED,
    "critical",
    {"min_failures": 3, "within": 600.0, "hold": -1.0, "actions": ["pull", "key.unwrap"], "identities": 64},
    {"min_failures": (1.0, 10000.0), "within": (10.0, DAY), "hold": (-1.0, DAY), "identities": (1.0, 10000.0)},
    "failed handshakes from a source, then an identity new at that source allowed to pull or unwrap",
)


class Correlator:
    """The ``correlated-intrusion`` rule (module docstring)."""

    def __init__(self, params: Params) -> None:
        self.p = params
        self.severity: str = params["severity"]
        self.sources = Table(int(params.num("max_entities")))
        self.within = params.num("within")
        self.hold = self.within if params.num("hold") < 0 else params.num("hold")

    def feed(self, ev: SecurityEvent) -> Detection | None:
        src = ev.source
        if not src or src == "?":
            return None
        if ev.kind == "tls":
            row = self.sources.get(src) or {"f": [], "i": []}
            row["f"].append(ev.time)
            del row["f"][:-50]
            reasons = row.setdefault("r", [])
            if ev.result not in reasons:
                reasons.append(ev.result)
                del reasons[:-4]
            self.sources.touch(src, row)
            return None
        who = principal(ev)
        if who is None or ev.operation != "authorize" or ev.outcome != "success":
            return None
        if ev.action not in self.p["actions"]:
            return None
        row = self.sources.get(src) or {"f": [], "i": []}
        new = remember(row["i"], who, int(self.p.num("identities")))
        failures = [t for t in row["f"] if ev.time - self.within <= t <= ev.time]
        self.sources.touch(src, row)
        if not new or len(failures) < self.p.num("min_failures"):
            return None
        row["f"] = []
        reasons = ", ".join(row.pop("r", []))
        summary = (
            f"{len(failures)} failed handshakes from {src} ({reasons}), then {who}, never seen there, "
            f"allowed {ev.action} {ev.resource} {ev.time - failures[0]:.0f} s after the first"
        )
        subject = {"identity": who, "source": src}
        evidence = (ev.entry,) if ev.entry is not None else ()
        return Detection(CORRELATED, self.severity, subject, summary, evidence, ev.time, src)


class Pipeline:
    """Detectors, correlation and de-duplication over one timeline; state in tables."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        config = dict(config or {})
        self.detectors = DetectorSet(config)
        params = Params(SPEC, detector_table(config, CORRELATED))
        self.correlator = Correlator(params) if params["enabled"] else None
        self.windows = {d.name: d.p.num("dedupe") for d in self.detectors.detectors}
        self.windows[CORRELATED] = params.num("dedupe")
        cap = int(max([d.p.num("max_entities") for d in self.detectors.detectors] + [float(COMMON["max_entities"])]))
        self.dedupe = Table(cap)
        self.pending = Table(MAX_PENDING)

    # -- the stream ---------------------------------------------------------------------

    def feed(self, ev: SecurityEvent) -> list[Detection]:
        """The detections reported at ``ev`` (held ones whose time has come first)."""
        out = self.flush(ev.time)
        found = self.detectors.feed(ev)
        intrusion = self.correlator.feed(ev) if self.correlator and ev.actor != MONITOR_ACTOR else None
        if intrusion is not None:
            self._fold(intrusion, found)
            found = [
                d
                for d in found
                if not (d.detector in FOLDED and d.subject.get("identity") == intrusion.subject.get("identity"))
            ]
            found.insert(0, intrusion)
        for d in found:
            if not self._fresh(d):
                continue
            if self.correlator is not None and d.detector in HELD:
                release = d.time + self.correlator.hold
                self.pending.touch(self._pending_id(d), {"r": release, "d": d.to_json()})
                continue
            out.append(d)
        return out

    def flush(self, now: float) -> list[Detection]:
        """Held detections due by ``now``, each reported at the end of its hold."""
        due = sorted((r["r"], e) for e, r in self.pending.rows.items() if r["r"] <= now)
        out = []
        for release, entity in due:
            row = self.pending.rows[entity]
            out.append(replace(Detection.from_json(row["d"]), time=float(release)))
            self._drop_pending(entity)
        return out

    def _fold(self, intrusion: Detection, found: list[Detection]) -> None:
        """Fold the source's held burst and the identity's novelty into ``intrusion``."""
        source, who = intrusion.subject.get("source", ""), intrusion.subject.get("identity", "")
        for entity, row in list(self.pending.rows.items()):
            held = row["d"]
            if held["detector"] in HELD and held["subject"].get("source") == source:
                self._drop_pending(entity)
        t = intrusion.time
        for name in HELD:
            self._mark(name, source, t)
        for d in found:
            if d.detector in FOLDED and d.subject.get("identity") == who:
                self._mark(d.detector, d.dedupe, t)

    def _fresh(self, d: Detection) -> bool:
        """Whether ``d`` is a new incident (not within its detector's window of the last report)."""
        key = f"{d.detector}{SEP}{d.dedupe}"
        last = self.dedupe.get(key)
        if last is not None and d.time - float(last["t"]) < self.windows.get(d.detector, 0.0):
            return False
        self.dedupe.touch(key, {"t": d.time})
        return True

    def _mark(self, detector: str, dedupe: str, t: float) -> None:
        self.dedupe.touch(f"{detector}{SEP}{dedupe}", {"t": t})

    @staticmethod
    def _pending_id(d: Detection) -> str:
        return f"{d.detector}{SEP}{d.dedupe}{SEP}{d.time!r}"

    def _drop_pending(self, entity: str) -> None:
        self.pending.remove(entity)  # deleted from the store at the next ``take``

    # -- state --------------------------------------------------------------------------

    def take(self) -> tuple[list[tuple[str, str, int, Row]], list[tuple[str, str]]]:
        """Rows changed since the last call (table, entity, order, row), and rows to delete."""
        changed, gone = self.detectors.take()
        for name, table in self._own():
            rows, evicted = table.take()
            changed.extend((name, e, o, r) for e, (o, r) in rows.items())
            gone.extend((name, e) for e in evicted)
        return changed, gone

    def load(self, rows: Iterable[tuple[str, str, int, Row]]) -> None:
        rows = list(rows)
        self.detectors.load(rows)
        for name, table in self._own():
            table.load([(e, o, r) for n, e, o, r in rows if n == name])

    def _own(self) -> list[tuple[str, Table]]:
        own = [("dedupe/", self.dedupe), ("pending/", self.pending)]
        if self.correlator is not None:
            own.insert(0, (f"{CORRELATED}/src", self.correlator.sources))
        return own


__all__ = ["FOLDED", "HELD", "SPEC", "Correlator", "Pipeline"]
