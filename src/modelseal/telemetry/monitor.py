"""The monitor: the anomaly detectors over the audit log and the server's TLS events, under
a lease in the shared database (docs/monitoring.md, "Anomaly detection").

``Monitor.run_once`` is one pass:

1. take or renew the lease (``DetectState.acquire``); without it, do nothing (another
   instance consumes); on a new tenure, load the state and cursors from the database;
2. deliver what a previous holder committed and did not deliver (``mon_outbox``);
3. read the verified audit entries after the cursor (``telemetry.audittail``: incremental,
   at most ``batch``) and the netevents after theirs; merge them by time, up to ``settle``
   seconds before now (a handshake is queued for up to a second before it is written; a
   decision for a moment in the server's audit writer), and no further than the end of
   either batch when it was full, so the two streams interleave in time order;
4. feed the timeline to the detectors and the correlation (``telemetry.correlate.Pipeline``,
   which skips the monitor's own events), export the events (``Exporter.write``);
5. commit, in one transaction, the changed state rows, the cursors and the detections
   (the outbox), fenced by the lease's generation and the cursors read in step 1;
6. per detection: the configured response (``[monitor.respond]``: a hold through
   ``HoldStore.place``, audited ``hold-place``), the audit event
   ``AuditEvent("anomaly", "anomaly:DETECTOR", "alert:SEVERITY", actor="modelseal-monitor",
   source=...)``, ``modelseal_anomaly_alerts_total{detector}``, the alert to every sink and
   to the exporter; then the outbox entry is deleted.

A detection older than ``backlog`` seconds (a first start on a long log, a monitor that was
down for days) teaches the baselines but is not alerted (counted in the log). A crash after
the commit and before delivery delivers at the next pass, possibly twice for a detection
that was half delivered (the hold is idempotent). Configuration: ``MonitorConfig``.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.errors import ModelsealError
from modelseal.governance.holds import HoldStore, place_event
from modelseal.telemetry.alerting import Alert, AlertSink, send_all
from modelseal.telemetry.audittail import AuditCursor, AuditTail, FollowedLog
from modelseal.telemetry.correlate import Pipeline
from modelseal.telemetry.detectbase import Detection
from modelseal.telemetry.detectors import MONITOR_ACTOR
from modelseal.telemetry.detectstate import DetectState
from modelseal.telemetry.export import Exporter
from modelseal.telemetry.logthrottle import ThrottledLog
from modelseal.telemetry.monitorconfig import HOLD_OF, MonitorConfig
from modelseal.telemetry.secevents import SecurityEvent, from_audit, from_tls

log = logging.getLogger("modelseal.telemetry")


@dataclass
class PassResult:
    """What one pass did: ``held`` (this instance has the lease), ``events`` read,
    ``alerts`` delivered, ``more`` (a batch was full: run again soon), ``problem`` (the
    audit log stopped verifying at the cursor)."""

    held: bool
    events: int = 0
    alerts: list[Alert] = field(default_factory=list)
    more: bool = False
    problem: str | None = None


def holder_id() -> str:
    """This process's lease holder name: host, process and a random part."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(4)}"


def alert_id(d: Detection) -> str:
    """A stable id per detection: a receiver sees a repeated delivery as the same alert."""
    digest = hashlib.sha256(f"{d.detector}\x00{d.dedupe}\x00{d.time!r}".encode()).hexdigest()
    return f"al-{digest[:16]}"


class Monitor:
    """One instance of the monitor (see the module docstring)."""

    def __init__(
        self,
        state: DetectState,
        audit: FollowedLog | None,
        config: MonitorConfig | None = None,
        *,
        sinks: Sequence[AlertSink] = (),
        exporter: Exporter | None = None,
        holds: HoldStore | None = None,
        audit_sink: AuditSink | None = None,
        holder: str | None = None,
        env: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``env``: the server's environment, where a key or source hold is placed (an
        identity hold is in the identity's own)."""
        self.state, self.config = state, config or MonitorConfig()
        self.tail = AuditTail(audit, self.config.batch) if audit is not None else None
        self.sinks, self.exporter, self.holds, self.audit_sink = list(sinks), exporter, holds, audit_sink
        self.holder = holder or holder_id()
        self.env, self.clock = env, clock
        self._generation: int | None = None
        self._pipeline: Pipeline | None = None
        self._cursors: dict[str, str] = {}
        self._failures = ThrottledLog(log)
        self._skipped = ThrottledLog(log, every=300.0)

    # -- one pass ------------------------------------------------------------------------

    def run_once(self) -> PassResult:
        now = self.clock()
        generation = self.state.acquire(self.holder, now, self.config.lease)
        if generation is None:
            self._generation = self._pipeline = None
            return PassResult(held=False)
        if generation != self._generation or self._pipeline is None:
            self._load()
            self._generation = generation
        pipeline = self._pipeline
        assert pipeline is not None
        self._deliver(self.state.outbox())
        events, cursors, more, problem, complete = self._read(now)
        found: list[Detection] = []
        for ev in events:
            found.extend(pipeline.feed(ev))
        found.extend(pipeline.flush(complete))  # held detections whose hold ended in a time read whole
        self._export(events)
        changed, gone = pipeline.take()
        fresh = [d for d in found if d.time >= now - self.config.backlog]
        if len(fresh) < len(found):
            self._skipped.note("%d detection(s) older than the backlog not alerted (latest: %s)", found[-1].detector)
        outbox = [(alert_id(d), now, d.to_json()) for d in fresh]
        expect = {name: self._cursors.get(name) for name in cursors}
        if not self.state.commit(self.holder, generation, expect, cursors, changed, gone, outbox):
            log.warning("monitor: the lease or the cursors moved during the pass; reloading")
            self._generation = self._pipeline = None
            return PassResult(held=False, problem=problem)
        self._cursors.update(cursors)
        alerts = self._deliver([(ident, doc) for ident, _, doc in outbox])
        return PassResult(True, len(events), alerts, more, problem)

    def _load(self) -> None:
        rows, cursors = self.state.load()
        pipeline = Pipeline(self.config.detectors)
        pipeline.load(rows)
        self._pipeline, self._cursors = pipeline, cursors

    def _read(self, now: float) -> tuple[list[SecurityEvent], dict[str, str], bool, str | None, float]:
        """The next events in time order, the cursors after them, whether more are waiting,
        the audit log's problem at the cursor, if any, and the time up to which every event
        has now been read (module docstring, step 3)."""
        batch, cutoff = self.config.batch, now - self.config.settle
        entries, problem, audit_full = [], None, False
        cursor = AuditCursor.from_json(self._cursors.get("audit"))
        if self.tail is not None:
            tail = self.tail.read(cursor)
            entries, problem, audit_full = tail.entries, tail.problem, tail.more
            if problem is not None:
                self._failures.note("monitor: %d pass(es) stopped at the audit log: %s", problem)
        net_after = int(self._cursors.get("net") or 0)
        net = self.state.netevents_after(net_after, batch)
        if audit_full and entries:
            cutoff = min(cutoff, max(e.time for e in entries))
        if len(net) >= batch:
            cutoff = min(cutoff, max(r[1] for r in net))
        audit_events = []
        for e in entries:  # a prefix in log order: the cursor can only stop at an entry
            if e.time > cutoff:
                break
            audit_events.append(e)
        net_rows = []
        for r in net:
            if r[1] > cutoff:
                break
            net_rows.append(r)
        net_cursor = net_rows[-1][0] if net_rows else net_after
        cursors = {"audit": cursor.advance(audit_events).to_json(), "net": str(net_cursor)}
        timeline = heapq.merge(
            (from_audit(e.event) for e in audit_events),
            (from_tls(t, source, reason, actor) for _, t, source, reason, actor in net_rows),
            key=lambda ev: ev.time,
        )
        events = list(timeline)
        more = (audit_full and len(audit_events) == len(entries)) or len(net) >= batch
        return events, cursors, more, problem, cutoff

    def _export(self, events: list[SecurityEvent]) -> None:
        if self.exporter is None or not events:
            return
        try:
            self.exporter.write(events)
        except Exception as e:  # the SIEM's file or socket is its own problem, not the detectors'
            self._failures.note("monitor: %d export(s) of events failed (latest: %s)", type(e).__name__)

    # -- per detection -------------------------------------------------------------------

    def _deliver(self, outbox: Sequence[tuple[str, dict[str, Any]]]) -> list[Alert]:
        alerts, done = [], []
        for ident, doc in outbox:
            done.append(ident)
            try:
                d = Detection.from_json(doc)
            except (KeyError, TypeError, ValueError):
                continue
            alerts.append(self._act(ident, d))
        self.state.delivered(done)
        return alerts

    def _act(self, ident: str, d: Detection) -> Alert:
        action = self.config.respond.get(d.detector, "alert")
        if action != "alert" and not self._respond(action, d):
            action = "alert"
        subject = {k: v for k, v in d.subject.items() if k in ("identity", "key", "source", "artifact")}
        alert = Alert(ident, d.time, d.detector, d.severity, d.summary, subject, d.evidence, action)
        src = d.subject.get("source")
        what, result = f"anomaly:{d.detector}", f"alert:{d.severity}"
        about = d.subject.get("identity") or d.subject.get("key") or d.subject.get("artifact")
        event = AuditEvent("anomaly", what, result, actor=MONITOR_ACTOR, time=d.time, source=src, subject=about)
        self._emit(event)  # the detection's own time and subject: an alert is matched to its incident
        try:
            from modelseal.telemetry.metrics import ANOMALY_ALERTS

            ANOMALY_ALERTS.labels(detector=d.detector).inc()
        except Exception as e:  # prometheus_client missing (no server extra): the alert still goes
            self._failures.note("monitor: %d anomaly count(s) not kept (latest: %s)", type(e).__name__)
        send_all(self.sinks, alert)
        if self.exporter is not None:
            try:
                self.exporter.write_alert(alert)
            except Exception as e:
                self._failures.note("monitor: %d export(s) of alerts failed (latest: %s)", type(e).__name__)
        return alert

    def _respond(self, action: str, d: Detection) -> bool:
        """Place the hold ``action`` asks for on ``d``'s subject; whether it is in place."""
        kind = HOLD_OF[action]
        subject = d.subject.get({"identity": "identity", "key": "key", "source": "source"}[kind])
        if self.holds is None or not subject:
            self._failures.note("monitor: %d response(s) not possible (latest: %s)", f"{action} without a subject")
            return False
        text = f"{d.detector}: {d.summary}"  # quotes audit rows: one printable line, as a hold's reason must be
        reason = "".join(c if c.isprintable() else " " for c in text)[:500]
        env = None if kind == "identity" else self.env
        try:
            hold, created = self.holds.place_once(kind, subject, reason, MONITOR_ACTOR, now=self.clock(), env=env)
        except ModelsealError as e:
            self._failures.note("monitor: %d hold(s) not placed (latest: %s)", type(e).__name__)
            return False
        if created:
            self._emit(place_event(hold, source=d.subject.get("source")))
        return True

    def _emit(self, event: AuditEvent) -> None:
        if self.audit_sink is None:
            return
        try:
            self.audit_sink.emit(event)
        except Exception as e:
            self._failures.note("monitor: %d audit event(s) not written (latest: %s)", type(e).__name__)

    def close(self) -> None:
        """Give the lease up (another instance takes over at once)."""
        try:
            self.state.release(self.holder)
        except ModelsealError as e:
            log.warning("monitor: could not release the lease (%s)", type(e).__name__)


__all__ = ["Monitor", "MonitorConfig", "PassResult", "alert_id", "holder_id"]
