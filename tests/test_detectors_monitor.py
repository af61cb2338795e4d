"""The monitor engine over real stores (telemetry.monitor, detectstate, audittail, netevents):
a tamper-evident audit log and the shared database (SQLite; PostgreSQL 15 for the two-instance
test), alerts, the anomaly audit event, the counter and the configured hold; the incremental
verified read stopping at a changed row; state that survives a restart; two instances on one
database, one consuming under the lease and the other taking over when it expires, with no
event processed twice or lost; and the handshake recorder."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelseal.audit.events import AuditEvent, MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.governance.holds import HoldStore
from modelseal.keys.config import ConfigError
from modelseal.telemetry.alerting import MemoryAlertSink
from modelseal.telemetry.audittail import AuditCursor, AuditTail
from modelseal.telemetry.detectstate import DetectState
from modelseal.telemetry.metrics import ANOMALY_ALERTS
from modelseal.telemetry.monitor import Monitor, PassResult
from modelseal.telemetry.monitorconfig import MonitorConfig
from modelseal.telemetry.netevents import NetEventRecorder
from tests.services import postgres

T0 = 1_800_000_000.0
ALICE = "spiffe://example.org/prod/service/alice"
CAROL = "spiffe://example.org/prod/service/carol"
OFFICER = "spiffe://example.org/prod/user/officer"
INTRUDER = "198.51.100.7"


@dataclass(frozen=True)
class Hs:
    """What a handshake observer receives (server.handshakes.Handshake's attributes)."""

    time: float
    source: str
    ok: bool
    reason: str | None = None
    actor: str | None = None


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def decision(t: float, who: str, action: str, resource: str, allowed: bool, src: str = "10.1.1.5") -> AuditEvent:
    result = "allow:role-reader" if allowed else "deny:default"
    return AuditEvent("authorize", f"{action} {resource}", result, actor=who, time=t, source=src)


def timeline() -> tuple[list[AuditEvent], list[Hs]]:
    """30 denied unwraps by alice (a failure burst), 12 failed handshakes from an outside
    source then carol pulling from it (one correlated intrusion), a key disable (lifecycle)."""
    audit = [decision(T0 + i * 10, ALICE, "key.unwrap", f"Key:k{i % 3}", False) for i in range(30)]
    tls = [Hs(T0 + 400 + i * 5, INTRUDER, False, "unknown-ca") for i in range(12)]
    tls.append(Hs(T0 + 400, "10.1.1.9", True))  # a completed handshake: not recorded
    # the resource quotes a terminal escape: the hold's reason and the alert must stay one printable line
    audit += [decision(T0 + 500 + i, CAROL, "pull", "Repository:team/m\x1b[2J", True, INTRUDER) for i in range(3)]
    audit.append(decision(T0 + 600, OFFICER, "key.disable", "Key:prod-llm", True))
    return audit, tls


EXPECTED = ["failure-burst", "correlated-intrusion", "lifecycle"]


@dataclass
class Rig:
    log: MerkleAuditLog
    state: DetectState
    holds: HoldStore
    clock: Clock
    alerts: MemoryAlertSink
    events: MemorySink

    def monitor(self, config: MonitorConfig | None = None, holder: str | None = None) -> Monitor:
        return Monitor(
            self.state,
            self.log,
            config or MonitorConfig(settle=0.0, backlog=365 * 86400.0),
            sinks=[self.alerts],
            holds=self.holds,
            audit_sink=self.events,
            holder=holder,
            env="prod",
            clock=self.clock,
        )

    def fill(self) -> None:
        audit, tls = timeline()
        self.log.emit_many(audit)
        recorder = NetEventRecorder(self.state)
        for hs in tls:
            recorder.record(hs)
        recorder.flush()
        recorder.close()


def rig(tmp_path: Path, target: str | None = None, audit: str | None = None) -> Rig:
    db = target or str(tmp_path / "governance.db")
    log = MerkleAuditLog(audit or tmp_path / "audit.db", key_path=tmp_path / "audit-signing.key")
    return Rig(log, DetectState.open(db), HoldStore.open(db), Clock(T0 + 3600), MemoryAlertSink(), MemorySink())


@pytest.fixture
def r(tmp_path: Path) -> Iterator[Rig]:
    made = rig(tmp_path)
    yield made
    made.state.close()
    made.holds.close()


def drain(m: Monitor, passes: int = 50) -> list[PassResult]:
    out = []
    for _ in range(passes):
        result = m.run_once()
        out.append(result)
        if not result.events and not result.more:
            break
    return out


def detectors(results: list[PassResult]) -> list[str]:
    return [a.detector for p in results for a in p.alerts]


def test_a_pass_alerts_audits_counts_and_responds(r: Rig) -> None:
    r.fill()
    before = ANOMALY_ALERTS.labels(detector="correlated-intrusion")._value.get()
    config = MonitorConfig(settle=0.0, backlog=365 * 86400.0, respond={"correlated-intrusion": "refuse-source"})
    results = drain(r.monitor(config))
    assert detectors(results) == EXPECTED
    alert = results[0].alerts[1]
    assert alert.subject == {"identity": CAROL, "source": INTRUDER} and alert.action == "refuse-source"
    assert alert.evidence and "\x1b" not in alert.summary  # the pull's audit entry
    anomalies = [e for e in r.events.events if e.operation == "anomaly"]
    assert [(e.key, e.result, e.actor) for e in anomalies] == [
        ("anomaly:failure-burst", "alert:warning", "modelseal-monitor"),
        ("anomaly:correlated-intrusion", "alert:critical", "modelseal-monitor"),
        ("anomaly:lifecycle", "alert:warning", "modelseal-monitor"),
    ]
    assert anomalies[1].source == INTRUDER
    held = r.holds.active()
    assert [(h.kind, h.subject, h.placed_by) for h in held] == [("source", INTRUDER, "modelseal-monitor")]
    assert held[0].reason.startswith("correlated-intrusion: 12 failed handshakes") and held[0].reason.isprintable()
    assert [e.operation for e in r.events.events].count("hold-place") == 1
    assert ANOMALY_ALERTS.labels(detector="correlated-intrusion")._value.get() == before + 1
    assert r.alerts.alerts == [a for p in results for a in p.alerts]
    # nothing new: nothing more, and the monitor's own events do not feed back
    r.log.emit_many(r.events.events)
    assert detectors(drain(r.monitor(config))) == []


def test_bad_monitor_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="respond"):
        MonitorConfig.from_table({"respond": {"failure-burst": "delete-everything"}})
    with pytest.raises(ConfigError, match="unknown detector"):
        MonitorConfig.from_table({"respond": {"nope": "alert"}})
    with pytest.raises(ConfigError, match="interval"):
        MonitorConfig.from_table({"interval": 0})
    with pytest.raises(ConfigError, match="unknown setting"):
        MonitorConfig.from_table({"detectors": {"unwrap-rate": {"nope": 1}}})
    assert MonitorConfig.from_table({"metrics_interval": 60, "interval": 2}).interval == 2.0  # others' keys pass


def test_the_tail_reads_incrementally_and_stops_at_a_changed_row(r: Rig, tmp_path: Path) -> None:
    r.log.emit_many([decision(T0 + i, ALICE, "pull", "Repository:r", True) for i in range(20)])
    tail = AuditTail(r.log, batch=8)
    first = tail.read(AuditCursor())
    assert [e.seq for e in first.entries] == list(range(1, 9)) and first.more and first.problem is None
    cursor = AuditCursor.from_json(AuditCursor().advance(first.entries).to_json())
    second = tail.read(cursor)
    assert [e.seq for e in second.entries] == list(range(9, 17))
    cursor = cursor.advance(second.entries)
    db = sqlite3.connect(tmp_path / "audit.db")  # someone with write access edits entry 18
    db.execute("DROP TRIGGER events_no_update")
    db.execute("UPDATE events SET event = replace(event, 'alice', 'mallory') WHERE seq = 18")
    db.commit()
    db.close()
    third = tail.read(cursor)
    assert [e.seq for e in third.entries] == [17] and "18" in (third.problem or "")
    assert tail.read(cursor.advance(third.entries)).entries == []  # stuck there, never past it


def test_state_survives_a_restart(r: Rig, tmp_path: Path) -> None:
    r.fill()
    small = MonitorConfig(settle=0.0, backlog=365 * 86400.0, batch=10)
    first = r.monitor(small)
    got = [first.run_once(), first.run_once()]  # part of the log, then "the process stops"
    first.close()
    r.state.close()
    r.state = DetectState.open(tmp_path / "governance.db")  # a new process, from the database
    got += drain(r.monitor(small))
    assert detectors(got) == EXPECTED
    assert sum(p.events for p in got) == 34 + 12  # every audit entry and failed handshake, once
    other = rig(tmp_path / "one-run")
    other.fill()
    assert [a.to_dict() for p in got for a in p.alerts] == [
        a.to_dict() for p in drain(other.monitor()) for a in p.alerts
    ]
    other.state.close()
    other.holds.close()


def _two_instances(r: Rig) -> None:
    r.fill()
    small = MonitorConfig(settle=0.0, backlog=365 * 86400.0, batch=10, lease=30.0)
    a, b = r.monitor(small, holder="a"), r.monitor(small, holder="b")
    one = a.run_once()
    assert one.held and one.events > 0
    assert b.run_once() == PassResult(held=False)  # a holds the lease: b does nothing
    r.clock.t += 31  # a stalls past its lease (no renewal, no release)
    two = b.run_once()
    assert two.held and two.events > 0
    stale = a.run_once()  # a is back: the lease is b's now, a neither reads nor commits
    assert not stale.held
    rest = drain(b)
    results = [one, two, *rest]
    assert detectors(results) == EXPECTED  # each once
    assert sum(p.events for p in results) == 34 + 12  # none twice, none lost
    assert not r.state.outbox()


def test_two_instances_share_the_work_under_the_lease(r: Rig) -> None:
    _two_instances(r)


def test_two_instances_on_postgresql(tmp_path: Path) -> None:
    with postgres() as url:
        pg = rig(tmp_path, url, url)
        try:
            _two_instances(pg)
        finally:
            pg.state.close()
            pg.holds.close()


def test_a_fenced_holder_cannot_commit(r: Rig) -> None:
    assert r.state.acquire("a", T0, 30) == 1
    assert r.state.acquire("a", T0 + 5, 30) == 1  # renewed: the same tenure
    assert r.state.acquire("b", T0 + 10, 30) is None
    assert r.state.acquire("b", T0 + 40, 30) == 2  # expired: b's tenure
    assert not r.state.commit("a", 1, {}, {"net": "5"}, [], [])
    assert r.state.commit("b", 2, {"net": None}, {"net": "5"}, [], [])
    assert not r.state.commit("b", 2, {"net": None}, {"net": "9"}, [], [])  # the cursor moved meanwhile
    assert r.state.load()[1] == {"net": "5"}


def test_the_recorder_keeps_failed_handshakes_bounded_and_never_raises(r: Rig) -> None:
    rec = NetEventRecorder(r.state, max_queue=5, clock=r.clock)
    rec.record(Hs(T0, "10.0.0.1", True))  # a completed one: nothing
    rec.record(object())  # type: ignore[arg-type]  # not a handshake at all: swallowed
    for i in range(8):
        rec.record(Hs(T0 + i, "10.0.0.2", False, "expired" if i % 2 else "Not A Reason", "spiffe://x/y"))
    assert rec.dropped == 3
    rec.flush()
    rows = r.state.netevents_after(0, 100)
    assert [(t, s, why) for _, t, s, why, _ in rows] == [
        (T0 + 3, "10.0.0.2", "expired"),
        (T0 + 4, "10.0.0.2", "other"),
        (T0 + 5, "10.0.0.2", "expired"),
        (T0 + 6, "10.0.0.2", "other"),
        (T0 + 7, "10.0.0.2", "expired"),
    ]
    assert rec.flush() == 0  # written once
    r.clock.t = T0 + 8 * 86400  # a week later the hourly prune deletes them
    rec._pruned = 0.0
    rec.flush()
    assert r.state.netevents_after(0, 100) == []
    rec.close()
