"""The detectors of what a principal has not done before (docs/monitoring.md, "Anomaly
detection"): ``new-key`` and ``new-source`` (b), ``off-hours`` (c).

They learn a profile per principal (the keys it used, the networks it came from, the hours
it is active at) and report a departure from it once the profile means something: after
``learning`` seconds of the monitor and ``principal_learning`` of the principal (a fresh
deployment, or a service deployed today, does not alert on everything it does). State in
capped ``Table``s of JSON rows (``telemetry.detectbase``). Pure: no I/O, no clock.
"""

from __future__ import annotations

from modelseal.telemetry.detectbase import (
    DAY,
    HOUR,
    SEP,
    Context,
    Detection,
    Detector,
    Params,
    Row,
    Spec,
    Table,
    burst,
    key_use,
    network_of,
    principal,
    remember,
)
from modelseal.telemetry.secevents import SecurityEvent

_NOVEL_BOUNDS = {"learning": (0.0, 90 * DAY), "principal_learning": (0.0, 90 * DAY), "fresh_key": (0.0, 90 * DAY)}


def _learned(ev: SecurityEvent, ctx: Context, p: Params) -> bool:
    return ev.time - ctx.start >= p.num("learning") and ev.time - ctx.first >= p.num("principal_learning")


class NewKey(Detector):
    """A principal's first use of a key, after the learning periods, of a key that has been
    in use (by anyone) for ``fresh_key`` seconds: the first users of a key rolled out today
    are its rollout, not a deviation."""

    SPEC = Spec(
        "new-key",
        "warning",
        {"learning": 7 * DAY, "principal_learning": DAY, "fresh_key": DAY, "keys_per_principal": 256},
        {**_NOVEL_BOUNDS, "keys_per_principal": (1.0, 10000.0)},
        "a principal's first use of a key that others have used for a while",
    )

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.tables["keys"] = Table(int(params.num("max_entities")))

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        who, key = principal(ev), key_use(ev)
        if who is None or key is None:
            return []
        keys = self.tables["keys"]
        first_use = keys.get(key) or {"f": ev.time}
        keys.touch(key, first_use)
        row = self.table.get(who) or {"k": []}
        new = remember(row["k"], key, int(self.p.num("keys_per_principal")))
        self.table.touch(who, row)
        if not new or not _learned(ev, ctx, self.p) or ev.time - float(first_use["f"]) < self.p.num("fresh_key"):
            return []
        subject = {"identity": who, "key": key, "source": ev.source or ""}
        return [self.found(ev, subject, f"{who} used key {key} for the first time", None, f"{who}{SEP}{key}")]


class NewSource(Detector):
    """A principal seen from a network (``prefix_v4``/``prefix_v6``) it was never seen
    from, after the learning periods: a new address in a known network (DHCP, a new pod) is
    not news, nor a network ``shared_by`` other principals have used for ``shared_age``
    seconds (an office floor, the VPN's pool; 0: every network counts): an intruder's
    network does not become shared by serving three stolen identities in one night."""

    SPEC = Spec(
        "new-source",
        "warning",
        {"learning": 7 * DAY, "principal_learning": DAY, "prefix_v4": 24, "prefix_v6": 48, "networks": 64}
        | {"shared_by": 3, "shared_age": 7 * DAY},
        {**_NOVEL_BOUNDS, "prefix_v4": (8.0, 32.0), "prefix_v6": (16.0, 64.0), "networks": (1.0, 10000.0)}
        | {"shared_by": (0.0, 1000.0), "shared_age": (0.0, 365 * DAY)},
        "a principal seen from a network it was never seen from",
    )

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.tables["nets"] = Table(int(params.num("max_entities")))

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        who = principal(ev)
        if who is None or not ev.source or ev.source == "?" or ev.kind != "audit" or ev.operation != "authorize":
            return []
        net = network_of(ev.source, int(self.p.num("prefix_v4")), int(self.p.num("prefix_v6")))
        row = self.table.get(who) or {"n": []}
        if row["n"] and row["n"][-1] == net:
            self.table.touch(who, row)
            return []  # the usual case: the network of the last request
        new = remember(row["n"], net, int(self.p.num("networks")))
        self.table.touch(who, row)
        if not new:
            return []
        shared_by = int(self.p.num("shared_by"))
        users = self.tables["nets"].get(net) or {"p": [], "f": ev.time}
        shared = shared_by > 0 and len(users["p"]) >= shared_by and ev.time - users["f"] >= self.p.num("shared_age")
        if not shared and who not in users["p"]:
            users["p"].append(who)
            self.tables["nets"].touch(net, users)
        if shared or not _learned(ev, ctx, self.p):
            return []
        subject = {"identity": who, "source": ev.source}
        summary = f"{who} seen from {ev.source}, a network ({net}) it was never seen from"
        return [self.found(ev, subject, summary, None, f"{who}{SEP}{net}")]


class OffHours(Detector):
    """Activity in an hour of the day (UTC) that, with its two neighbours, holds less than
    ``min_share`` of the principal's learned histogram (decaying with ``half_life``), once
    it has ``min_days`` and ``min_events`` of history: ``burst`` such events within
    ``window`` seconds fire. An event at an unusual hour enters the histogram only at the
    next day, as ``learn_off`` of an event: an intruder's own requests do not make 3 a.m.
    usual within the night, and a new schedule becomes usual within days. Hour of day, not of week: weekend
    work at the usual hours is common; the volume detectors watch weekends too. The
    histogram is in UTC and per principal, so a principal's own time zone is learned. One
    alert per principal per ``dedupe`` (6 h): a night's session is one incident."""

    SPEC = Spec(
        "off-hours",
        "warning",
        {"min_share": 0.005, "min_days": 7, "min_events": 200, "burst": 10, "window": HOUR, "half_life": 30 * DAY}
        | {"learn_off": 0.5, "dedupe": 6 * HOUR},
        {
            "min_share": (0.0, 1.0),
            "learn_off": (0.0, 1.0),
            "min_days": (1.0, 365.0),
            "min_events": (1.0, 1e9),
            "burst": (1.0, 10000.0),
            "window": (60.0, DAY),
            "half_life": (DAY, 365 * DAY),
        },
        "activity at hours the principal is not active at",
    )

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        who = principal(ev)
        if who is None or ev.kind != "audit":
            return []
        day, hour = int(ev.time // DAY), int(ev.time % DAY // HOUR)
        row: Row = self.table.get(who) or {"d": day, "c": 0.0, "h": [0.0] * 24}
        if day > row["d"]:
            decay = 0.5 ** ((day - row["d"]) * DAY / self.p.num("half_life"))
            late = row.pop("q", [0.0] * 24)  # yesterday's unusual hours, learned at a discount
            row["h"] = [x * decay + self.p.num("learn_off") * y for x, y in zip(row["h"], late, strict=True)]
            row["c"] = sum(row["h"])
            row["d"] = day
        h = row["h"]
        learned = ev.time - ctx.first >= self.p.num("min_days") * DAY and row["c"] >= self.p.num("min_events")
        share = (h[hour - 1] + h[hour] + h[(hour + 1) % 24]) / row["c"] if row["c"] else 1.0
        off_hour = learned and share < self.p.num("min_share")
        if off_hour:
            row.setdefault("q", [0.0] * 24)[hour] += 1.0
        else:
            h[hour] += 1.0
            row["c"] += 1.0
        self.table.touch(who, row)
        if not off_hour:
            return []
        off = row.setdefault("o", {})
        if not burst(off, ev.time, ev.entry, int(self.p.num("burst")), self.p.num("window")):
            return []
        summary = f"{who} active at {hour:02d}:00 UTC, an hour that holds {share:.2%} of its history"
        evidence = off.pop("ev", [])
        return [self.found(ev, {"identity": who, "source": ev.source or ""}, summary, {"ev": evidence}, who)]


__all__ = ["NewKey", "NewSource", "OffHours"]
