"""The volume detectors over key uses and pulls (docs/monitoring.md, "Anomaly detection"):
``unwrap-rate`` (a), ``failure-burst`` (d), ``exfiltration`` (e) and ``pull-rate`` (i).

Each reads ``SecurityEvent``s in time order and keeps its state per entity (a (principal,
key) pair, a principal) in a capped ``Table`` of JSON rows (``telemetry.detectbase``). A
baseline learns a count per bucket with an EWMA of its mean and variance. Three rules keep
it honest: no alert before the principal has been watched for ``warmup`` seconds (one
with no history of this kind at all, a service that never pulled, is compared with the
floor alone, which is the point: its first bulk pull is news); a baseline younger than
``warmup`` is no baseline (the floor alone again: an incident's first bucket must not
become its own baseline); and a bucket that fired enters the baseline at its threshold,
not its count (an incident does not raise the bar for the next one). Pure: no I/O, no clock.
"""

from __future__ import annotations

import math

from modelseal.telemetry.detectbase import (
    DAY,
    HOUR,
    SEP,
    Context,
    Detection,
    Detector,
    Row,
    Spec,
    add_evidence,
    alpha_of,
    burst,
    corrected,
    is_failure,
    is_pull,
    key_use,
    new_baseline,
    principal,
    roll,
    threshold,
    touched_item,
)
from modelseal.telemetry.secevents import SecurityEvent

_RATE_BOUNDS = {
    "bucket": (60.0, DAY),
    "half_life": (HOUR, 90 * DAY),
    "k": (1.0, 100.0),
    "floor": (1.0, 1e9),
    "warmup": (0.0, 90 * DAY),
    "peak_factor": (0.0, 100.0),
}


def _limit(row: Row, alpha: float, size: float, warmup: float, k: float, floor: float, peak: float) -> float:
    """The bar ``row``'s current bucket must pass: the floor while its baseline is young."""
    if int(row["k"]) * size < warmup:
        return floor
    return threshold(row, alpha, k, floor, peak)


class RateDetector(Detector):
    """Count per entity per ``bucket`` seconds against its EWMA mean and variance (memory
    halving in ``half_life``, start-up bias corrected): fires once per bucket when the count
    exceeds ``max(floor, mean + k * sd, peak_factor * peak)`` (module docstring for the
    warm-up). ``peak``: the highest bucket, decaying like the mean, for loads that come in
    runs (a nightly job's busy hour is its normal, however rare). De-duplicated per
    principal: one principal's spike across several keys is one incident."""

    def entity(self, ev: SecurityEvent) -> tuple[str, dict[str, str], str] | None:
        """(entity, subject, what it did) of a counted event; None for any other."""
        raise NotImplementedError

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        got = self.entity(ev)
        if got is None:
            return []
        entity, subject, what = got
        p = self.p
        size = p.num("bucket")
        b = int(ev.time // size)
        alpha = alpha_of(size, p.num("half_life"))
        row = self.table.get(entity) or new_baseline(b)
        roll(row, b, alpha)
        row["n"] += 1
        add_evidence(row, ev.entry)
        self.table.touch(entity, row)
        if row["n"] <= p.num("floor") or row["f"] == b or ev.time - ctx.first < p.num("warmup"):
            return []
        limit = _limit(row, alpha, size, p.num("warmup"), p.num("k"), p.num("floor"), p.num("peak_factor"))
        if row["n"] <= limit:
            return []
        row["f"], row["c"] = b, limit
        m, v = corrected(row, alpha)
        summary = (
            f"{what}: {row['n']} in {size / 60:g} min, above the baseline "
            f"{m:.1f} +/- {math.sqrt(v):.1f} (threshold {limit:.0f})"
        )
        return [self.found(ev, subject, summary, row, subject["identity"])]  # one incident per principal


class UnwrapRate(RateDetector):
    SPEC = Spec(
        "unwrap-rate",
        "critical",
        {"bucket": 600.0, "half_life": 3 * DAY, "k": 6.0, "floor": 50.0, "warmup": DAY, "peak_factor": 1.5},
        _RATE_BOUNDS,
        "key uses per (principal, key) per bucket above the EWMA baseline by k sigma",
    )

    def entity(self, ev: SecurityEvent) -> tuple[str, dict[str, str], str] | None:
        who, key = principal(ev), key_use(ev)
        if who is None or key is None:
            return None
        return f"{who}{SEP}{key}", {"identity": who, "key": key, "source": ev.source or ""}, f"{who} used key {key}"


class PullRate(RateDetector):
    SPEC = Spec(
        "pull-rate",
        "warning",
        {"bucket": 600.0, "half_life": 3 * DAY, "k": 6.0, "floor": 40.0, "warmup": DAY, "peak_factor": 1.5},
        _RATE_BOUNDS,
        "pull decisions per identity per bucket above the EWMA baseline by k sigma",
    )

    def entity(self, ev: SecurityEvent) -> tuple[str, dict[str, str], str] | None:
        who = principal(ev)
        if who is None or not is_pull(ev):
            return None
        return who, {"identity": who, "source": ev.source or ""}, f"{who} pulled"


class FailureBurst(Detector):
    """``burst`` failed key operations or denied decisions of one principal within
    ``window`` seconds. ``ignore``: results that are not the principal's doing: an
    outage's ``deny:unavailable``, a ``KeyProviderError``, and ``deny:hold:*`` (a hold in
    place is the response to an incident already reported)."""

    SPEC = Spec(
        "failure-burst",
        "warning",
        {"burst": 20, "window": 1800.0, "ignore": ["deny:unavailable", "deny:hold:*", "KeyProviderError"]},
        {"burst": (2.0, 100000.0), "window": (10.0, DAY)},
        "a burst of failed decryptions or denied requests of one principal",
    )

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        who = principal(ev)
        if who is None or not is_failure(ev, self.p["ignore"]):
            return []
        row = self.table.get(who) or {}
        fired = burst(row, ev.time, ev.entry, int(self.p.num("burst")), self.p.num("window"))
        self.table.touch(who, row)
        if not fired:
            return []
        n, w = int(self.p.num("burst")), self.p.num("window")
        summary = f"{who}: {n} failed or denied requests within {w / 60:g} min (latest: {ev.result})"
        found = self.found(ev, {"identity": who, "source": ev.source or ""}, summary, row, who)
        row.pop("ev", None)
        return [found]


class Exfiltration(Detector):
    """Distinct artifacts and repositories one principal read within the last ``window``
    seconds (at most ``max_items`` remembered), against the EWMA baseline of that count
    sampled every ``window``: fires when it exceeds ``max(min_distinct, mean + k * sd)``,
    once per window (module docstring for the warm-up)."""

    SPEC = Spec(
        "exfiltration",
        "critical",
        {"window": 2 * HOUR, "half_life": 7 * DAY, "k": 6.0, "min_distinct": 20, "warmup": DAY, "max_items": 256},
        {**_RATE_BOUNDS, "window": (60.0, DAY), "min_distinct": (2.0, 1e6), "max_items": (2.0, 100000.0)},
        "bulk reads across many distinct artifacts or repositories",
    )

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        who, item = principal(ev), touched_item(ev)
        if who is None or item is None:
            return []
        p = self.p
        size = p.num("window")
        b = int(ev.time // size)
        alpha = alpha_of(size, p.num("half_life"))
        row = self.table.get(who) or new_baseline(b)
        items: dict[str, float] = row.setdefault("i", {})
        if b > row["b"]:
            row["n"] = sum(1 for t in items.values() if t >= row["b"] * size)  # the closing window's count
            roll(row, b, alpha)
        new = item not in items
        items.pop(item, None)
        items[item] = ev.time  # most recent last
        while len(items) > p.num("max_items"):
            del items[next(iter(items))]
        self.table.touch(who, row)
        if not new or row["f"] == b or ev.time - ctx.first < p.num("warmup"):
            return []  # only a new item can raise the count
        add_evidence(row, ev.entry)
        recent = sum(1 for t in items.values() if t > ev.time - size)
        if recent <= p.num("min_distinct"):
            return []
        limit = _limit(row, alpha, size, p.num("warmup"), p.num("k"), p.num("min_distinct"), 0.0)
        if recent <= limit:
            return []
        row["f"], row["c"] = b, limit
        summary = f"{who} read {recent} distinct artifacts/repositories in {size / 60:g} min (threshold {limit:.0f})"
        return [self.found(ev, {"identity": who, "source": ev.source or ""}, summary, row, who)]


__all__ = ["Exfiltration", "FailureBurst", "PullRate", "RateDetector", "UnwrapRate"]
