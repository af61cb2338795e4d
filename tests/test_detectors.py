"""The pure anomaly detectors and the correlation (telemetry.detectors, keydetectors, novelty,
correlate): each fires on its pattern and stays quiet on normal traffic; the configuration is
checked; the state survives a JSON round trip; and a short labelled trace meets the issue's
targets (recall >= 0.9, at most one false alert a day)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from modelseal.keys.config import ConfigError
from modelseal.telemetry.correlate import Pipeline
from modelseal.telemetry.detectbase import Detection
from modelseal.telemetry.secevents import SecurityEvent, from_tls

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from anomaly_eval import run, table
from anomaly_trace import Trace

T0 = 1780272000.0  # a Monday, 00:00 UTC
DAY, HOUR, MIN = 86400.0, 3600.0, 60.0
ALICE = "spiffe://example.org/prod/service/alice"
BOB = "spiffe://example.org/prod/user/bob"
CAROL = "spiffe://example.org/prod/service/carol"
_entry = iter(range(1, 10**9))


def decision(
    t: float, who: str, action: str, resource: str, allowed: bool = True, src: str = "10.1.1.5"
) -> SecurityEvent:
    return SecurityEvent(
        time=t,
        kind="audit",
        operation="authorize",
        result="allow:role-reader" if allowed else "deny:default",
        outcome="success" if allowed else "denied",
        actor=who,
        source=src,
        action=action,
        resource=resource,
        key=f"{action} {resource}",
        entry=next(_entry),
    )


def op(t: float, who: str, operation: str, key: str, result: str = "ok") -> SecurityEvent:
    outcome = "success" if result == "ok" else "failure"
    return SecurityEvent(t, "audit", operation, result, outcome, actor=who, key=key, entry=next(_entry))


def feed(p: Pipeline, events: Iterable[SecurityEvent]) -> list[Detection]:
    out: list[Detection] = []
    last = 0.0
    for ev in sorted(events, key=lambda e: e.time):
        out.extend(p.feed(ev))
        last = ev.time
    return out + p.flush(last + DAY)


def names(found: list[Detection]) -> list[str]:
    return [d.detector for d in found]


def steady(who: str, action: str, resource: str, days: float, per_hour: int, start: float = T0, **kw: Any):
    """``per_hour`` evenly spaced decisions for ``days``."""
    step = HOUR / per_hour
    return [decision(start + i * step, who, action, resource, **kw) for i in range(int(days * DAY / step))]


def office(who: str, days: int, resource: str = "Repository:team/m", action: str = "pull") -> list[SecurityEvent]:
    """Weekday office hours, 09:00-17:00 UTC, 12 requests an hour."""
    out = []
    for d in range(days):
        if d % 7 >= 5:
            continue
        for i in range(8 * 12):
            out.append(decision(T0 + d * DAY + 9 * HOUR + i * 300, who, action, resource))
    return out


# -- (a) unwrap rate and (i) pull rate -------------------------------------------------------


def test_unwrap_rate_fires_on_a_spike_and_not_on_its_baseline() -> None:
    base = steady(ALICE, "key.unwrap", "Key:prod-llm", 3, 60)
    assert names(feed(Pipeline(), base)) == []
    spike = [decision(T0 + 3 * DAY + 5 + i * 2, ALICE, "key.unwrap", "Key:prod-llm") for i in range(300)]
    found = [d for d in feed(Pipeline(), base + spike) if d.detector == "unwrap-rate"]
    assert len(found) == 1  # once per incident: the buckets after it are de-duplicated
    assert found[0].subject == {"identity": ALICE, "key": "prod-llm", "source": "10.1.1.5"}
    assert found[0].evidence and found[0].severity == "critical"


def test_a_rate_is_not_judged_before_the_principal_is_known_for_the_warmup() -> None:
    spike = [decision(T0 + 600 + i, ALICE, "key.unwrap", "Key:prod-llm") for i in range(300)]
    assert "unwrap-rate" not in names(feed(Pipeline(), spike))  # a fresh deployment, day one


def test_pull_rate_fires_for_an_identity_that_pulls_far_more_than_usual() -> None:
    base = steady(CAROL, "pull", "Repository:team/m", 2, 6)
    burst = [decision(T0 + 2 * DAY + i * 3, CAROL, "pull", "Repository:team/m") for i in range(150)]
    assert "pull-rate" not in names(feed(Pipeline(), base))
    assert "pull-rate" in names(feed(Pipeline(), base + burst))


# -- (b) novelty -------------------------------------------------------------------------------


def test_new_key_fires_after_learning_for_an_established_key_only() -> None:
    history = steady(ALICE, "key.unwrap", "Key:a", 8, 2) + steady(CAROL, "key.unwrap", "Key:b", 8, 2)
    later = T0 + 8 * DAY
    novel = [decision(later + i, ALICE, "key.unwrap", "Key:b") for i in range(3)]  # carol's key for a week
    rollout = [decision(later + 1000, ALICE, "key.unwrap", "Key:brand-new")]  # nobody used it before
    found = [d for d in feed(Pipeline(), history + novel + rollout) if d.detector == "new-key"]
    assert [d.subject["key"] for d in found] == ["b"]


def test_new_key_is_quiet_during_the_learning_period() -> None:
    events = [*steady(CAROL, "key.unwrap", "Key:b", 3, 2), decision(T0 + 2 * DAY, ALICE, "key.unwrap", "Key:b")]
    assert "new-key" not in names(feed(Pipeline(), events))


def test_new_source_fires_for_a_new_network_not_a_new_address_in_a_known_one() -> None:
    history = steady(ALICE, "pull", "Repository:r", 8, 2, src="10.1.1.5")
    later = T0 + 8 * DAY
    same_net = decision(later, ALICE, "pull", "Repository:r", src="10.1.1.77")
    elsewhere = decision(later + 60, ALICE, "pull", "Repository:r", src="203.0.113.9")
    found = [d for d in feed(Pipeline(), [*history, same_net, elsewhere]) if d.detector == "new-source"]
    assert [d.subject["source"] for d in found] == ["203.0.113.9"]


def test_new_source_ignores_a_network_many_principals_share() -> None:
    people = [f"spiffe://example.org/prod/user/p{i}" for i in range(4)]
    history = [e for who in people for e in steady(who, "pull", "Repository:r", 9, 1, src="10.60.0.1")]
    history += steady(ALICE, "pull", "Repository:r", 9, 1, src="10.1.1.5")
    vpn = decision(T0 + 9 * DAY, ALICE, "pull", "Repository:r", src="10.60.0.200")  # the VPN everyone uses
    assert "new-source" not in names(feed(Pipeline(), [*history, vpn]))


# -- (c) off hours -------------------------------------------------------------------------------


def test_off_hours_fires_at_night_for_an_office_worker_and_not_in_the_day() -> None:
    history = office(BOB, 14)
    night = [decision(T0 + 14 * DAY + 3 * HOUR + i * 60, BOB, "pull", "Repository:team/m") for i in range(15)]
    day = [decision(T0 + 14 * DAY + 10 * HOUR + i * 60, BOB, "pull", "Repository:team/m") for i in range(15)]
    assert "off-hours" not in names(feed(Pipeline(), history + day))
    found = [d for d in feed(Pipeline(), history + night) if d.detector == "off-hours"]
    assert len(found) == 1 and found[0].subject["identity"] == BOB and len(found[0].evidence) >= 10


def test_off_hours_leaves_a_round_the_clock_service_alone() -> None:
    events = steady(ALICE, "key.unwrap", "Key:a", 15, 4)
    assert "off-hours" not in names(feed(Pipeline(), events))


# -- (d) failures, (e) exfiltration, (f) lifecycle -----------------------------------------------------


def test_failure_burst_fires_on_many_denials_not_on_a_few_or_on_held_ones() -> None:
    burst = [decision(T0 + i * 10, ALICE, "key.unwrap", f"Key:k{i}", allowed=False) for i in range(25)]
    few = burst[:5]
    held = [
        SecurityEvent(T0 + i, "audit", "authorize", "deny:hold:0123456789abcdef", "denied", actor=ALICE, entry=i)
        for i in range(50)
    ]
    assert "failure-burst" in names(feed(Pipeline(), burst))
    assert "failure-burst" not in names(feed(Pipeline(), few))
    assert "failure-burst" not in names(feed(Pipeline(), held))  # the response's own denials


def test_failed_decryptions_count_as_failures() -> None:
    found = feed(Pipeline(), [op(T0 + i, "alice", "unwrap", "local:kek", "DecryptionError") for i in range(25)])
    assert "failure-burst" in names(found)


def test_exfiltration_fires_on_many_distinct_repositories() -> None:
    history = steady(ALICE, "pull", "Repository:team/a", 2, 4)
    bulk = [decision(T0 + 2 * DAY + i * 30, ALICE, "pull", f"Repository:team/m{i}") for i in range(40)]
    again = [decision(T0 + 2 * DAY + i * 30, ALICE, "pull", "Repository:team/a") for i in range(40)]
    assert "exfiltration" in names(feed(Pipeline(), history + bulk))
    assert "exfiltration" not in names(feed(Pipeline(), history + again))  # the same one, often


def test_every_disable_destroy_policy_and_hold_change_alerts_once() -> None:
    officer = "spiffe://example.org/prod/user/officer"
    events = [
        decision(T0, officer, "key.disable", "Key:prod-llm"),
        op(T0 + 1, officer, "disable", "transit:prod-llm"),  # the broker's operation after its decision
        decision(T0 + 100, officer, "policy.propose", "Governance:policy"),
        op(T0 + 101, officer, "policy-propose", "policy:abc"),
        op(T0 + 200, "root", "destroy", "local:old-kek"),  # a local destroy: no decision before it
        op(T0 + 300, officer, "hold-release", "hold:0123456789abcdef", "ok:identity:x"),
        op(T0 + 400, "modelseal-monitor", "hold-place", "hold:fedcba9876543210", "ok:identity:x"),
        decision(T0 + 500, ALICE, "pull", "Repository:r"),
    ]
    found = [d for d in feed(Pipeline(), events) if d.detector == "lifecycle"]
    assert [d.summary.split(" change")[0] for d in found] == ["disable", "policy", "destroy", "hold-release"]


# -- network paths, correlation ----------------------------------------------------------------------------


def test_handshake_burst_is_reported_after_its_hold() -> None:
    failures = [from_tls(T0 + i * 5, "198.51.100.7", "unknown-ca") for i in range(12)]
    p = Pipeline()
    assert [d for ev in failures for d in p.feed(ev)] == []  # held: a pull may still fold it in
    released = p.flush(T0 + 3600)
    assert names(released) == ["handshake-burst"] and released[0].subject == {"source": "198.51.100.7"}
    assert released[0].time == pytest.approx(T0 + 55 + 600)  # reported at the end of its hold


def test_a_few_failed_handshakes_are_not_a_burst() -> None:
    assert feed(Pipeline(), [from_tls(T0 + i * 60, "10.9.9.9", "expired") for i in range(3)]) == []


def test_pin_mismatch_always_alerts() -> None:
    found = feed(Pipeline(), [op(T0, "alice", "pin-mismatch", "registry:r.example.org:443", "PinMismatch")])
    assert names(found) == ["pin-mismatch"] and found[0].severity == "critical"


def test_failed_handshakes_then_a_new_identity_pulling_is_one_alert_not_three() -> None:
    src = "198.51.100.7"
    history = steady(ALICE, "pull", "Repository:r", 8, 2, src="10.1.1.5")
    failures = [from_tls(T0 + 8 * DAY + i * 5, src, "unknown-ca") for i in range(12)]
    pulls = [decision(T0 + 8 * DAY + 300 + i, ALICE, "pull", "Repository:r", src=src) for i in range(3)]
    found = feed(Pipeline(), history + failures + pulls)
    assert names(found) == ["correlated-intrusion"]
    assert found[0].subject == {"identity": ALICE, "source": src} and found[0].severity == "critical"
    # without the pull: the burst alone, after its hold; without the failures: the new source alone
    assert names(feed(Pipeline(), history + failures)) == ["handshake-burst"]
    assert names(feed(Pipeline(), history + pulls)) == ["new-source"]


def test_an_identity_already_seen_at_the_source_is_not_an_intrusion() -> None:
    src = "10.1.1.5"
    history = steady(ALICE, "pull", "Repository:r", 2, 2, src=src)
    failures = [from_tls(T0 + 2 * DAY + i, src, "expired") for i in range(4)]
    pull = decision(T0 + 2 * DAY + 60, ALICE, "pull", "Repository:r", src=src)
    assert "correlated-intrusion" not in names(feed(Pipeline(), [*history, *failures, pull]))


def test_the_monitors_own_events_never_feed_back() -> None:
    mine = [op(T0 + i, "modelseal-monitor", "hold-place", f"hold:{i:016x}", "ok:source:1.2.3.4") for i in range(30)]
    assert feed(Pipeline(), mine) == []


# -- configuration and state -------------------------------------------------------------------------------


def test_configuration_is_checked_and_applied() -> None:
    with pytest.raises(ConfigError, match="unknown detector"):
        Pipeline({"no-such": {}})
    with pytest.raises(ConfigError, match="unknown setting"):
        Pipeline({"unwrap-rate": {"kk": 1}})
    with pytest.raises(ConfigError, match="must be a number"):
        Pipeline({"unwrap-rate": {"k": "six"}})
    with pytest.raises(ConfigError, match="from"):
        Pipeline({"handshake-burst": {"burst": 1}})
    with pytest.raises(ConfigError, match="severity"):
        Pipeline({"pin-mismatch": {"severity": "info"}})
    quiet = Pipeline({"pin-mismatch": {"enabled": False}})
    assert feed(quiet, [op(T0, "alice", "pin-mismatch", "registry:r:443", "PinMismatch")]) == []
    loud = Pipeline(
        {"handshake-burst": {"burst": 3, "severity": "critical"}, "correlated-intrusion": {"enabled": False}}
    )
    found = feed(loud, [from_tls(T0 + i, "10.9.9.9", "expired") for i in range(3)])
    assert [(d.detector, d.severity) for d in found] == [("handshake-burst", "critical")]


def test_state_is_bounded_per_detector() -> None:
    p = Pipeline({"new-source": {"max_entities": 10}})
    feed(p, [decision(T0 + i, f"spiffe://example.org/prod/service/s{i}", "pull", "Repository:r") for i in range(50)])
    detector = p.detectors.by_name("new-source")
    assert detector is not None and len(detector.table.rows) == 10


def _roundtrip(rows: list[tuple[str, str, int, dict[str, Any]]]) -> list[tuple[str, str, int, dict[str, Any]]]:
    return [(t, e, o, json.loads(json.dumps(r))) for t, e, o, r in rows]


def test_state_through_json_gives_the_same_detections_as_one_run() -> None:
    events = list(Trace(days=3, principals=8, seed=3, warm=1, per_kind=1).events())
    config = {"new-key": {"learning": DAY}, "new-source": {"learning": DAY}}
    whole = feed(Pipeline(config), events)
    first, second = Pipeline(config), Pipeline(config)
    half = len(events) // 2
    found = [d for ev in events[:half] for d in first.feed(ev)]
    stored: dict[tuple[str, str], tuple[str, str, int, dict[str, Any]]] = {}
    changed, gone = first.take()
    for row in _roundtrip(changed):
        stored[(row[0], row[1])] = row
    for key in gone:
        stored.pop(key, None)
    second.load(stored.values())
    found += feed(second, events[half:])
    assert whole and [d.to_json() for d in found] == [d.to_json() for d in whole]


# -- the labelled trace ------------------------------------------------------------------------------------

SHORT = {
    "new-key": {"learning": DAY, "principal_learning": DAY / 2, "fresh_key": DAY / 2},
    "new-source": {"learning": DAY, "principal_learning": DAY / 2, "shared_age": DAY},
    "off-hours": {"min_days": 2, "min_events": 50},
}


def test_a_short_labelled_trace_meets_the_targets() -> None:
    """5 days, 12 principals, two incidents of each kind from day 3 on, the learning periods
    scaled to the trace (a week of learning does not fit in five days)."""
    result = run(Trace(days=5, principals=12, seed=1, warm=3, per_kind=2), SHORT)
    overall = table(result)[-1]
    assert overall["detector"] == "overall" and overall["incidents"] >= 20
    assert overall["recall"] >= 0.9, overall
    assert overall["false_per_day"] <= 1.0, [d.summary for d in result.false()]
