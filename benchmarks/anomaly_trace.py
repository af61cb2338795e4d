"""A labelled synthetic security timeline for the anomaly detectors (docs/monitoring.md,
"Evaluation"), seeded and deterministic.

    python benchmarks/anomaly_trace.py [--days 30] [--principals 50] [--seed 1] [--jsonl PATH]

Normal traffic, from 2026-06-01 (a Monday) 00:00 UTC, for PRINCIPALS identities:

- services (half): steady broker unwraps (4-40 an hour) of one to three keys and pulls
  (none, or up to 8 an hour) of their repositories, with a diurnal swing (20-60 %); some
  are nightly batch jobs (a 1-3 h window after 01:00, 100-300 unwraps an hour) and two are
  mirrors (about 40 pulls an hour across 60 repositories);
- people (the other half): office hours on weekdays in their own time zone (start 07:00-
  09:30, 7.5-9.5 h, jittered daily; overtime of 1-3 h on 15 % of days; a weekend session on
  8 % of weekend days), unwraps (3-25 an hour) and pulls (1-8 an hour);
- sources: each principal in a /24 of its own (services: clusters in 10.1-10.8; people:
  office and VPN subnets shared by everyone, 10.50.0-3 and 10.60.0-3), a new address in the
  same network every few days (DHCP, pods moving), people moving between office subnets;
- noise: 0.2 % of decisions denied; a misconfigured deploy per service about monthly (3-60
  denials in minutes); traffic surges (x1.5-3 for hours, per service every ~20 days);
  rollouts (5-30 pulls in 10 minutes, per pulling service every ~3 days); failed
  handshakes (about 3 episodes a day of 1-6 failures from a random source: an expired
  client certificate retrying, a scanner);
- legitimate novelty: a principal starts using an established key (services every ~180
  days, people every ~120), a person works away for a day (every ~60 days: through a VPN
  subnet, or 15 % of the time from a network nobody uses), a service moves to a new cluster
  (every ~365 days), a batch job is rerun by hand at any hour (every ~60 days), a new key is
  rolled out to one to three services (every ~7 days), a new service deployed (every ~8 days);
- lifecycle: an officer disables a key or proposes and activates a policy every ~4 days.
  The rule is to alert on every such change, so each one is labelled (kind ``lifecycle``).

Injected incidents, from day ``warm`` (default 10: after the learning periods) on, each
kind equally often (``per_kind``, default 5), each on an established principal no other
incident used while there is one: ``unwrap-spike`` (400-4,000 unwraps of
one key in 10-60 min), ``new-key`` (3-20 unwraps of a key others use that the identity never
used), ``new-source`` (5-30 pulls from a random outside address), ``off-hours`` (15-60
requests of a person at 01:00-04:00 of their night), ``failure-burst`` (30-200 denials in
5-30 min), ``exfiltration`` (pulls of 40-150 distinct repositories in 30-120 min),
``lifecycle`` (an unplanned key disable), ``handshake-burst`` (20-300 failed handshakes in
3-20 min from an outside source), ``pin-mismatch`` (1-3 refusals on one client),
``pull-spike`` (300-1,500 pulls of its own repositories in 20-60 min), ``correlated``
(3-15 failed handshakes from an outside source, then 1-8 min later an established
service's identity pulls from it). Labels: (incident id, kind, start, end, subject).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from modelseal.telemetry.secevents import SecurityEvent, from_tls

T0 = 1780272000.0  # 2026-06-01T00:00:00Z, a Monday
DAY, HOUR, MINUTE = 86400.0, 3600.0, 60.0
TD = "spiffe://example.org/prod"
KINDS = ("unwrap-spike", "new-key", "new-source", "off-hours", "failure-burst", "exfiltration", "lifecycle")
KINDS += ("handshake-burst", "pin-mismatch", "pull-spike", "correlated")
EXPECTED = {  # the detector each kind is for
    "unwrap-spike": "unwrap-rate",
    "new-key": "new-key",
    "new-source": "new-source",
    "off-hours": "off-hours",
    "failure-burst": "failure-burst",
    "exfiltration": "exfiltration",
    "lifecycle": "lifecycle",
    "handshake-burst": "handshake-burst",
    "pin-mismatch": "pin-mismatch",
    "pull-spike": "pull-rate",
    "correlated": "correlated-intrusion",
}
REASONS = ("no-certificate", "unknown-ca", "expired", "protocol-version")


@dataclass(frozen=True)
class Incident:
    id: str
    kind: str
    start: float
    end: float
    subject: dict[str, str]


@dataclass
class Principal:
    name: str
    kind: str  # service, batch, mirror, person
    keys: list[str]
    repos: list[str]
    net: str  # "10.1.7": its /24
    host: int
    unwrap: float  # per hour, when active
    pull: float
    swing: float = 0.0
    phase: float = 0.0
    tz: float = 0.0
    start_h: float = 8.0
    length_h: float = 8.5
    since: float = T0
    surge: tuple[float, float, float] = (0.0, 0.0, 1.0)  # start, end, factor
    trip: tuple[float, float, str] = (0.0, 0.0, "")  # a day from another network
    extra: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"{TD}/{'user' if self.kind == 'person' else 'service'}/{self.name}"

    def address(self, t: float) -> str:
        if self.trip[0] <= t < self.trip[1]:
            return f"{self.trip[2]}.{self.host}"
        return f"{self.net}.{self.host}"


def decision(t: float, who: str, src: str, action: str, resource: str, allowed: bool = True) -> SecurityEvent:
    result = "allow:role-reader" if allowed else "deny:default"
    return SecurityEvent(
        time=t,
        kind="audit",
        operation="authorize",
        result=result,
        outcome="success" if allowed else "denied",
        actor=who,
        source=src,
        action=action,
        resource=resource,
        key=f"{action} {resource}",
    )


def audit_op(t: float, who: str, op: str, key: str, result: str = "ok", source: str | None = None) -> SecurityEvent:
    outcome = "success" if result.startswith("ok") else "failure"
    return SecurityEvent(
        time=t, kind="audit", operation=op, result=result, outcome=outcome, actor=who, key=key, source=source
    )


class Trace:
    """The generator (see the module docstring); ``events()`` yields the timeline in time
    order with audit entry numbers, ``incidents`` the labels."""

    def __init__(self, days: int = 30, principals: int = 50, seed: int = 1, warm: int = 10, per_kind: int = 5) -> None:
        self.days, self.seed, self.warm, self.per_kind = days, seed, warm, per_kind
        self.rng = np.random.default_rng(seed)
        self.keys = [f"model-{i:02d}" for i in range(1, 21)]
        self.repos = [f"team-{i % 12:02d}/model-{i:03d}" for i in range(200)]
        self.people: list[Principal] = []
        self.services: list[Principal] = []
        for i in range(principals):
            (self.people if i % 2 else self.services).append(self._principal(i))
        self.incidents: list[Incident] = []
        self._extra: dict[int, list[SecurityEvent]] = {}  # day -> events of incidents and novelty
        self._used: set[str] = set()  # principals an incident used
        self._plan()

    # -- the population ----------------------------------------------------------------

    def _principal(self, i: int) -> Principal:
        r = self.rng
        keys = list(r.choice(self.keys, size=int(r.integers(1, 4)), replace=False))
        if i % 2:  # a person
            p = Principal(f"person-{i:02d}", "person", keys, list(r.choice(self.repos, int(r.integers(3, 11)), False)),
                          f"10.{50 + 10 * int(r.integers(0, 2))}.{int(r.integers(0, 4))}", int(r.integers(2, 250)),
                          float(r.uniform(3, 25)), float(r.uniform(1, 8)))  # fmt: skip
            p.tz = float(r.choice([0, 0, 0, 1, -5, 8]))
            p.start_h, p.length_h = float(r.uniform(7, 9.5)), float(r.uniform(7.5, 9.5))
            return p
        kind = "mirror" if i in (4, 30) else "batch" if i % 10 == 2 else "service"
        repos = list(r.choice(self.repos, 60 if kind == "mirror" else int(r.integers(1, 5)), False))
        p = Principal(f"svc-{i:02d}", kind, keys, repos, f"10.{int(r.integers(1, 9))}.{int(r.integers(0, 256))}",
                      int(r.integers(2, 250)), float(r.uniform(4, 40)),
                      0.0 if r.random() < 0.3 else float(r.uniform(0.5, 8)),
                      float(r.uniform(0.2, 0.6)), float(r.uniform(0, 24)))  # fmt: skip
        if kind == "batch":
            p.unwrap, p.pull, p.start_h, p.length_h = float(r.uniform(100, 300)), float(r.uniform(5, 20)), 1.0, 0.0
            p.length_h = float(r.uniform(1, 3))
        if kind == "mirror":
            p.unwrap, p.pull = 2.0, 40.0
        return p

    def everyone(self) -> list[Principal]:
        return self.services + self.people

    # -- rates ---------------------------------------------------------------------------

    def _factor(self, p: Principal, t: float, day_jitter: float, overtime: float, weekend: bool) -> float:
        """How active ``p`` is at ``t`` (0 = not at all), relative to its rates."""
        if t < p.since:
            return 0.0
        local = (t / HOUR + p.tz) % 24
        if p.kind == "person":
            dow = int(((t + p.tz * HOUR) // DAY) % 7)
            start = p.start_h + day_jitter
            end = start + p.length_h + overtime
            if dow >= 5 and not weekend:
                return 0.0
            return 1.0 if start <= local < end else 0.0
        if p.kind == "batch":
            return 1.0 if p.start_h + day_jitter <= local < p.start_h + day_jitter + p.length_h else 0.0
        f = 1.0 + p.swing * math.sin(2 * math.pi * (local - p.phase) / 24)
        s0, s1, k = p.surge
        return f * (k if s0 <= t < s1 else 1.0)

    # -- normal traffic of one day ------------------------------------------------------

    def _day(self, d: int) -> list[SecurityEvent]:
        r = self.rng
        out: list[SecurityEvent] = []
        base = T0 + d * DAY
        for p in self.everyone():
            jitter = float(r.uniform(-0.5, 0.5))
            overtime = float(r.uniform(1, 3)) if r.random() < 0.15 else 0.0
            weekend = r.random() < 0.08
            if p.kind != "person" and r.random() < 1 / 3:
                p.host = int(r.integers(2, 250))  # a pod rescheduled, a lease renewed
            if p.kind == "person" and r.random() < 0.5:
                p.host = int(r.integers(2, 250))
            if p.kind == "person" and r.random() < 1 / 60:
                p.net = f"10.{p.net.split('.')[1]}.{int(r.integers(0, 4))}"  # another office subnet
            for h in range(24):
                t0 = base + h * HOUR
                f = self._factor(p, t0 + 1800, jitter, overtime, weekend)
                if f <= 0:
                    continue
                for what, rate in (("unwrap", p.unwrap), ("pull", p.pull)):
                    for _ in range(int(r.poisson(rate * f))):
                        out.append(self._use(p, what, t0 + float(r.uniform(0, HOUR))))
        out.extend(self._noise(d, base))
        return out

    def _use(self, p: Principal, what: str, t: float, src: str | None = None) -> SecurityEvent:
        r = self.rng
        allowed = r.random() >= 0.002
        src = src or p.address(t)
        if what == "unwrap":
            return decision(t, p.uri, src, "key.unwrap", f"Key:{p.keys[int(r.integers(0, len(p.keys)))]}", allowed)
        return decision(t, p.uri, src, "pull", f"Repository:{p.repos[int(r.integers(0, len(p.repos)))]}", allowed)

    def _noise(self, d: int, base: float) -> list[SecurityEvent]:
        r = self.rng
        out: list[SecurityEvent] = []
        for _ in range(int(r.poisson(3))):  # failed handshakes: expired clients retrying, scanners
            src = f"10.{int(r.integers(1, 90))}.{int(r.integers(0, 256))}.{int(r.integers(2, 250))}"
            if r.random() < 0.3:
                src = f"192.0.2.{int(r.integers(2, 250))}"
            t = base + float(r.uniform(0, DAY))
            reason = str(r.choice(REASONS))
            for _ in range(int(r.integers(1, 7))):
                t += float(r.uniform(5, 120))
                out.append(from_tls(t, src, reason))
        for p in self.services:
            if p.since > base:
                continue  # not deployed yet
            if r.random() < 1 / 30:  # a misconfigured deploy: denials for minutes (a batch job's at its run)
                t = base + float(r.uniform(0, DAY)) if p.kind != "batch" else base + p.start_h * HOUR + 600
                n = min(60, int(3 * float(r.pareto(1.5)) + 3))
                for _ in range(n):
                    t += float(r.uniform(5, 30))
                    out.append(decision(t, p.uri, p.address(t), "key.unwrap", f"Key:{self.keys[0]}", False))
            if p.kind == "batch":
                if r.random() < 1 / 60:  # a batch job rerun by hand, at any hour
                    self._rerun(p, base + float(r.uniform(0, DAY)), out)
                continue
            if p.pull and r.random() < 1 / 3:  # a rollout: every pod pulls its model
                t = base + float(r.uniform(0, DAY))
                for _ in range(int(r.integers(5, 31))):
                    out.append(self._use(p, "pull", t + float(r.uniform(0, 600))))
            if r.random() < 1 / 20:  # a traffic surge
                s = base + float(r.uniform(0, DAY))
                p.surge = (s, s + float(r.uniform(2, 6)) * HOUR, float(r.uniform(1.5, 3)))
        return out

    def _rerun(self, p: Principal, t: float, out: list[SecurityEvent]) -> None:
        for what, rate in (("unwrap", p.unwrap), ("pull", p.pull)):
            for _ in range(int(self.rng.poisson(rate * p.length_h))):
                out.append(self._use(p, what, t + float(self.rng.uniform(0, p.length_h * HOUR))))

    # -- novelty, lifecycle and incidents ------------------------------------------------

    def _add(self, t: float, ev: SecurityEvent) -> None:
        self._extra.setdefault(int((t - T0) // DAY), []).append(ev)

    def _plan(self) -> None:
        r = self.rng
        new_keys, n_services = 20, len(self.services)
        for d in range(1, self.days):
            base = T0 + d * DAY
            for p in self.everyone():
                if r.random() < 1 / (180 if p.kind != "person" else 120):
                    spare = [k for k in self.keys if k not in p.keys]
                    if spare:
                        p.extra.append(f"{d}:{spare[int(r.integers(0, len(spare)))]}")
                if p.kind == "person" and r.random() < 1 / 60:  # travel: mostly through the VPN
                    s = base + float(r.uniform(0, 12)) * HOUR
                    net = f"10.60.{int(r.integers(0, 4))}"
                    if r.random() < 0.15:
                        net = f"172.{int(r.integers(16, 32))}.{int(r.integers(0, 256))}"  # a partner's site
                    p.extra.append(f"trip:{s}:{net}")
                if p.kind == "service" and r.random() < 1 / 365:
                    p.extra.append(f"move:{d}:10.{int(r.integers(1, 9))}.{int(r.integers(0, 256))}")
            if r.random() < 1 / 7:  # a new key, rolled out to one to three services
                new_keys += 1
                key = f"model-{new_keys:02d}"
                self.keys.append(key)
                for p in list(r.choice(self.services, int(r.integers(1, 4)), False)):
                    p.extra.append(f"{d}:{key}")
            if r.random() < 1 / 8:  # a new service
                p = self._principal(2 * (n_services + len(self.services)))
                p.name, p.since = f"svc-new-{d:02d}", base + float(r.uniform(0, DAY))
                self.services.append(p)
            if r.random() < 1 / 4:
                self._lifecycle(base + float(r.uniform(9, 17)) * HOUR, planned=True)
        self._inject()

    def _lifecycle(self, t: float, planned: bool) -> None:
        r = self.rng
        officer = f"{TD}/user/officer-{int(r.integers(1, 4))}"
        src = f"10.50.0.{int(r.integers(2, 250))}"
        key = self.keys[int(r.integers(0, len(self.keys)))]
        if planned and r.random() < 0.5:
            digest = f"policy:{int(r.integers(0, 1 << 62)):016x}"
            self._add(t, decision(t, officer, src, "policy.propose", "Governance:policy"))
            self._add(t + 5, audit_op(t + 5, officer, "policy-propose", digest))
            t2 = t + float(r.uniform(600, 7200))
            self._add(t2, audit_op(t2, officer, "approval-run", "policy.activate Governance:policy", "done:ab12"))
            end = t2
        else:
            self._add(t, decision(t, officer, src, "key.disable", f"Key:{key}"))
            self._add(t + 1, audit_op(t + 1, officer, "disable", f"transit:{key}"))
            end = t + 1
        self._label("lifecycle", t, end, {"identity": officer})

    def _label(self, kind: str, start: float, end: float, subject: dict[str, str]) -> None:
        self.incidents.append(Incident(f"inc-{len(self.incidents) + 1:03d}", kind, start, end, subject))

    def _inject(self) -> None:
        r = self.rng
        slots = [k for k in KINDS for _ in range(self.per_kind)]
        r.shuffle(slots)
        span = (self.days - self.warm) * DAY - 6 * HOUR
        for i, kind in enumerate(slots):
            t = T0 + self.warm * DAY + span * (i + float(r.uniform(0.1, 0.9))) / len(slots)
            getattr(self, "_inc_" + kind.replace("-", "_"))(t)

    def _pick(self, kinds: tuple[str, ...] = ("service", "person")) -> Principal:
        """An established principal, one no other incident used while there are such: each
        incident is judged on its own, not on a profile an earlier incident taught."""
        pool = [p for p in self.everyone() if p.kind in kinds and p.since == T0]
        fresh = [p for p in pool if p.uri not in self._used] or pool
        p = fresh[int(self.rng.integers(0, len(fresh)))]
        self._used.add(p.uri)
        return p

    def _burst(self, p: Principal, t: float, n: int, minutes: float, what: str, src: str | None = None) -> float:
        end = t
        for _ in range(n):
            u = t + float(self.rng.uniform(0, minutes * MINUTE))
            end = max(end, u)
            self._add(u, self._use(p, what, u, src))
        return end

    def _inc_unwrap_spike(self, t: float) -> None:
        p = self._pick()
        key = p.keys[0]
        end = t
        for _ in range(int(self.rng.integers(400, 4001))):
            u = t + float(self.rng.uniform(0, float(self.rng.uniform(10, 60)) * MINUTE))
            end = max(end, u)
            self._add(u, decision(u, p.uri, p.address(u), "key.unwrap", f"Key:{key}"))
        self._label("unwrap-spike", t, end, {"identity": p.uri})

    def _inc_new_key(self, t: float) -> None:
        p = self._pick()
        planned = {x.split(":", 1)[1] for x in p.extra if not x.startswith(("trip", "move"))}
        in_use = sorted({k for q in self.everyone() if q is not p and q.since == T0 for k in q.keys})
        spare = [k for k in in_use if k not in p.keys and k not in planned]  # a key others use
        key = spare[int(self.rng.integers(0, len(spare)))]
        end = t
        for _ in range(int(self.rng.integers(3, 21))):
            u = t + float(self.rng.uniform(0, 30 * MINUTE))
            end = max(end, u)
            self._add(u, decision(u, p.uri, p.address(u), "key.unwrap", f"Key:{key}"))
        self._label("new-key", t, end, {"identity": p.uri})

    def _inc_new_source(self, t: float) -> None:
        p = self._pick()
        r = self.rng
        octets = (r.integers(11, 223), r.integers(0, 256), r.integers(0, 256), r.integers(2, 250))
        src = ".".join(str(int(x)) for x in octets)  # anywhere outside
        end = self._burst(p, t, int(self.rng.integers(5, 31)), float(self.rng.uniform(10, 60)), "pull", src)
        self._label("new-source", t, end, {"identity": p.uri})

    def _inc_off_hours(self, t: float) -> None:
        p = self._pick(("person",))
        day = T0 + ((t - T0) // DAY) * DAY
        t = day + ((float(self.rng.uniform(1, 3)) - p.tz) % 24) * HOUR
        n, minutes = int(self.rng.integers(15, 61)), float(self.rng.uniform(30, 90))
        end = max(self._burst(p, t, n // 2, minutes, "pull"), self._burst(p, t, n - n // 2, minutes, "unwrap"))
        self._label("off-hours", t, end, {"identity": p.uri})

    def _inc_failure_burst(self, t: float) -> None:
        p = self._pick()
        end, minutes = t, float(self.rng.uniform(5, 30))
        for _ in range(int(self.rng.integers(30, 201))):
            u = t + float(self.rng.uniform(0, minutes * MINUTE))
            end = max(end, u)
            key = self.keys[int(self.rng.integers(0, 20))]
            self._add(u, decision(u, p.uri, p.address(u), "key.unwrap", f"Key:{key}", False))
        self._label("failure-burst", t, end, {"identity": p.uri})

    def _inc_exfiltration(self, t: float) -> None:
        p = self._pick()
        end, minutes = t, float(self.rng.uniform(30, 120))
        for repo in self.rng.choice(self.repos, int(self.rng.integers(40, 151)), False):
            for _ in range(int(self.rng.integers(1, 3))):
                u = t + float(self.rng.uniform(0, minutes * MINUTE))
                end = max(end, u)
                self._add(u, decision(u, p.uri, p.address(u), "pull", f"Repository:{repo}"))
        self._label("exfiltration", t, end, {"identity": p.uri})

    def _inc_lifecycle(self, t: float) -> None:
        self._lifecycle(t, planned=False)

    def _inc_handshake_burst(self, t: float) -> None:
        src, end = f"198.51.100.{int(self.rng.integers(2, 250))}", t
        minutes = float(self.rng.uniform(3, 20))
        for _ in range(int(self.rng.integers(20, 301))):
            u = t + float(self.rng.uniform(0, minutes * MINUTE))
            end = max(end, u)
            self._add(u, from_tls(u, src, str(self.rng.choice(REASONS))))
        self._label("handshake-burst", t, end, {"source": src})

    def _inc_pin_mismatch(self, t: float) -> None:
        user = f"user{int(self.rng.integers(1, 99))}"
        end = t
        for i in range(int(self.rng.integers(1, 4))):
            end = t + 30 * i
            self._add(end, audit_op(end, user, "pin-mismatch", "registry:registry.example.org:443", "PinMismatch"))
        self._label("pin-mismatch", t, end, {"identity": user})

    def _inc_pull_spike(self, t: float) -> None:
        p = self._pick()
        end = self._burst(p, t, int(self.rng.integers(300, 1501)), float(self.rng.uniform(20, 60)), "pull")
        self._label("pull-spike", t, end, {"identity": p.uri})

    def _inc_correlated(self, t: float) -> None:
        src = f"198.51.100.{int(self.rng.integers(2, 250))}"
        u = t
        for _ in range(int(self.rng.integers(3, 16))):
            u += float(self.rng.uniform(2, 20))
            self._add(u, from_tls(u, src, str(self.rng.choice(REASONS))))
        p = self._pick(("service",))
        start = u + float(self.rng.uniform(1, 8)) * MINUTE
        end = self._burst(p, start, int(self.rng.integers(3, 21)), 5.0, "pull", src)
        self._label("correlated", t, end, {"identity": p.uri, "source": src})

    # -- the stream ----------------------------------------------------------------------

    def _apply_plans(self, d: int) -> None:
        for p in self.everyone():
            for plan in list(p.extra):
                parts = plan.split(":")
                if parts[0] == "trip" and float(parts[1]) < T0 + (d + 1) * DAY:
                    s = float(parts[1])
                    p.trip = (s, s + 10 * HOUR, parts[2])
                elif parts[0] == "move" and int(parts[1]) == d:
                    p.net = parts[2]
                elif parts[0] not in ("trip", "move") and int(parts[0]) == d:
                    p.keys.append(parts[1])
                else:
                    continue
                p.extra.remove(plan)

    def events(self) -> Iterator[SecurityEvent]:
        entry = 0
        for d in range(self.days):
            self._apply_plans(d)
            day = self._day(d) + self._extra.get(d, [])
            day.sort(key=lambda e: e.time)
            for ev in day:
                if ev.kind == "audit":
                    entry += 1
                    ev = replace(ev, entry=entry)
                yield ev


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--principals", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jsonl", metavar="PATH", help="write the events (and the labels to PATH.labels.json)")
    args = ap.parse_args()
    trace = Trace(args.days, args.principals, args.seed)
    n = 0
    out: Any = open(args.jsonl, "w") if args.jsonl else None  # noqa: SIM115
    for ev in trace.events():
        n += 1
        if out is not None:
            out.write(ev.to_json() + "\n")
    if out is not None:
        out.close()
        with open(args.jsonl + ".labels.json", "w") as f:
            json.dump([asdict(i) for i in trace.incidents], f, indent=1)
    print(f"{n} events, {len(trace.incidents)} incidents over {args.days} days")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
