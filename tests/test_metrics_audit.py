"""The audit part of the metrics pass and the counting of expired grants (red team, issue 14
section 1, findings 2, 6, 7 and 8).

``MerkleAuditLog.verify_from`` from no frontier says what ``verify`` says (intact and
tampered logs, a batch at a time), and from a frontier reads only what is new and still
catches a truncation or a changed new entry. The pass fails closed: a verification that
raises publishes ``modelseal_audit_log_verified 0``, keeps the time of the last success,
and says the part failed; a full verification runs at the first pass and then on its own
interval; the last backup is found in the new entries. An expired grant is counted once,
by the decider, and a failing counter never fails a decision.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from modelseal.audit.checks import AuditLogError
from modelseal.audit.events import AuditEvent, MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.governance.holds import HoldIndex, HoldStore
from modelseal.governance.model import Binding, Resource
from modelseal.governance.store import GovStore
from modelseal.pki.identity import Identity
from modelseal.server import authz as authz_mod
from modelseal.server.authz import Authz
from modelseal.telemetry import feed, metrics
from modelseal.telemetry.statepass import Sources, StatePass
from tests.conftest import Env


def tamper(path: Path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER IF EXISTS events_no_update; DROP TRIGGER IF EXISTS events_no_delete;" + sql)
    db.commit()
    db.close()


def a_log(path: Path, n: int, start: int = 0) -> MerkleAuditLog:
    log = MerkleAuditLog(path)
    for i in range(start, start + n):
        log.emit(AuditEvent("authorize", f"pull Repository:team/m{i}", "allow:role-reader", actor="spiffe://e/x"))
    return log


CASES = {
    "intact": "",
    "an event's text edited": "UPDATE events SET event = replace(event, 'allow', 'deny') WHERE seq = 5;",
    "a row deleted": "DELETE FROM events WHERE seq = 7;",
    "the last rows deleted": "DELETE FROM events WHERE seq > 8;",
    "an event not JSON": "UPDATE events SET event = 'not json' WHERE seq = 3;",
    "a head changed": "UPDATE events SET head = zeroblob(32) WHERE seq = 9;",
    "a malformed key in meta": "UPDATE meta SET v = 'zz' WHERE k LIKE '%key%';",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_from_the_start_says_what_verify_says(env: Env, case: str) -> None:
    path = env.work / "audit.db"
    a_log(path, 10)
    tamper(path, CASES[case])
    log = MerkleAuditLog(path)
    try:
        whole = log.verify()
    except AuditLogError as e:
        with pytest.raises(AuditLogError, match=str(e)[:30]):
            log.verify_from(None, batch=3)
        return
    v, frontier = log.verify_from(None, batch=3)
    assert (v.ok, v.first_bad, v.reason) == (whole.ok, whole.first_bad, whole.reason), case
    assert v.ok == (case == "intact")
    if v.ok:
        assert (frontier.size, frontier.root()) == (whole.size, whole.head) == (10, whole.head)


class CountingStore:
    """The log's store, counting the rows it hands out."""

    def __init__(self, store: Any) -> None:
        self.store, self.fetched = store, 0

    def rows_after(self, seq: int, limit: int) -> list[Any]:
        got = self.store.rows_after(seq, limit)
        self.fetched += len(got)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_verify_from_a_frontier_reads_only_what_is_new(env: Env) -> None:
    path = env.work / "audit.db"
    log = a_log(path, 40)
    v, frontier = log.verify_from(None, batch=16)
    assert v.ok and frontier.size == 40
    a_log(path, 5, start=40)
    counting = CountingStore(log.store)
    log.store = counting  # type: ignore[assignment]
    v2, f2 = log.verify_from(frontier, batch=16)
    assert v2.ok and f2.size == 45 and f2.root() == log.verify().head
    assert counting.fetched < 10, counting.fetched  # the 5 new rows and a few heads, not 45 rows
    assert frontier.size == 40  # the caller's frontier is left as it was
    # A new entry changed, or the log cut back below what was verified: both fail from the frontier.
    tamper(path, "UPDATE events SET event = replace(event, 'allow', 'deny') WHERE seq = 44;")
    bad, kept = log.verify_from(frontier)
    assert not bad.ok and bad.first_bad == 44 and kept is frontier
    tamper(path, "DELETE FROM events WHERE seq > 30;")
    cut, _ = log.verify_from(f2)
    assert not cut.ok and "no longer holds" in cut.reason


def gauges(families: list[Any]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(f.name, labels): value for f in families for labels, value in f.samples}


def test_the_audit_part_fails_closed_and_keeps_the_last_success(env: Env) -> None:
    path = env.work / "audit.db"
    a_log(path, 5)
    now = [1_000_000.0]
    sp = StatePass(Sources(audit=MerkleAuditLog(path)), every={"audit": 1.0}, clock=lambda: now[0])
    sp.run_due()
    got = gauges(sp.families())
    assert got[("modelseal_audit_log_verified", ())] == 1
    assert got[("modelseal_audit_log_last_verification_timestamp_seconds", ())] == 1_000_000.0
    assert got[("modelseal_state_pass_success", ("audit",))] == 1
    # Someone with write access to the database makes verification raise rather than fail.
    tamper(path, "UPDATE meta SET v = 'zz' WHERE k LIKE '%key%';")
    now[0] += 60
    sp.run_due()
    got = gauges(sp.families())
    assert got[("modelseal_audit_log_verified", ())] == 0  # could not be verified: not verified
    assert got[("modelseal_audit_log_last_verification_timestamp_seconds", ())] == 1_000_000.0  # kept
    assert got[("modelseal_state_pass_success", ("audit",))] == 0
    assert got[("modelseal_state_pass_last_success_timestamp_seconds", ("audit",))] == 1_000_000.0
    assert got[("modelseal_state_pass_success", ("keys",))] == 1  # the other parts are unaffected


def test_a_first_verification_that_raises_still_publishes_zero(env: Env) -> None:
    path = env.work / "audit.db"
    a_log(path, 3)
    tamper(path, "UPDATE meta SET v = 'zz' WHERE k LIKE '%key%';")
    got = gauges(StatePass(Sources(audit=MerkleAuditLog(path))).run_all())
    assert got[("modelseal_audit_log_verified", ())] == 0
    assert got[("modelseal_audit_log_last_verification_timestamp_seconds", ())] == 0  # never: stale at once


def test_full_verification_on_its_interval_and_backups_from_new_entries(env: Env) -> None:
    path = env.work / "audit.db"
    log = a_log(path, 5)
    now = [2_000_000.0]
    every = {"keys": 1e9, "holds": 1e9, "audit": 1.0, "artifacts": 1e9, "audit-full": 100.0}
    sp = StatePass(Sources(audit=log), every=every, clock=lambda: now[0])
    sp.run_due()
    assert sp.audit.fulls == 1 and sp.audit.frontier is not None and sp.audit.frontier.size == 5
    log.emit(AuditEvent("backup-create", "backup:nightly", "ok", actor="ops", time=1_999_000.0))
    log.emit(AuditEvent("backup-create", "backup:nightly", "StorageError", actor="ops", time=1_999_500.0))
    log.emit(AuditEvent("backup-drill", "backup:nightly", "ok", actor="ops", time=1_999_100.0))
    now[0] += 10
    sp.run_due()
    assert sp.audit.fulls == 1 and sp.audit.frontier is not None and sp.audit.frontier.size == 8  # incremental
    got = gauges(sp.families())
    assert got[("modelseal_backup_last_success_timestamp_seconds", ())] == 1_999_000.0  # the failed one is not
    assert got[("modelseal_backup_drill_last_success_timestamp_seconds", ())] == 1_999_100.0
    now[0] += 100
    sp.run_due()
    assert sp.audit.fulls == 2  # full_verify_interval elapsed: from the first entry again
    assert gauges(sp.families())[("modelseal_backup_last_success_timestamp_seconds", ())] == 1_999_000.0


def grant() -> float:
    return metrics.REGISTRY.get_sample_value("modelseal_expired_credentials_total", {"kind": "grant"}) or 0.0


def test_an_expired_grant_is_counted_once_and_a_failing_counter_fails_no_decision(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = str(env.work / "gov.db")
    store = GovStore.open(target)
    holds = HoldStore.open(target)
    who = Identity.of("example.org", "prod", "service", "lapsed")
    t0 = time.time()
    store.bind(Binding("", who.uri, "reader", "prod", t0 + 60), by="tests")
    sink = MemorySink()
    decider = Authz(store, None, "prod", "example.org", feed.CountingSink(sink), now=lambda: t0 + 3600)
    decider.holds = HoldIndex(holds)
    try:
        before = grant()
        d = decider.decide(who, "pull", Resource("Repository", "team/m", {"env": "prod"}))
        assert not d.allowed and grant() == before + 1  # once: the decider's count, none in the sink

        class Broken:
            def labels(self, **kw: str) -> Any:
                raise FileNotFoundError("the metrics directory is gone")

        monkeypatch.setattr(authz_mod, "EXPIRED_CREDENTIALS", Broken())
        d = decider.decide(who, "pull", Resource("Repository", "team/m", {"env": "prod"}))
        assert not d.allowed  # the deny, not an exception
        assert [e.result for e in sink.events] == ["deny:default", "deny:default"]
    finally:
        decider.close()
        holds.close()
        store.close()
