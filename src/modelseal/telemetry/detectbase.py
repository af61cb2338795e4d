"""The pieces every anomaly detector is built from (docs/monitoring.md, "Anomaly detection").

``Detection``: what a detector reports. ``Table``: the per-entity state of one detector, a
JSON-able dict per entity, least recently touched evicted beyond a cap, and the set of
entities changed (or evicted) since the last ``take``, so only those rows are written.
``Baseline``: functions over one entity's row that keep an exponentially weighted mean and
variance of a count per time bucket. ``Burst``: a sliding window of the last N event times.
``Params``: one ``[monitor.detectors.NAME]`` table checked against the detector's defaults.
``Detector``: the base of every detector, fed one event at a time with a ``Context``. And
what counts as what, one rule each so that no use is counted twice:

- a key use (``key_use``): an allowed ``key.unwrap``/``key.rewrap``/``key.wrap`` decision
  (the broker and the server: the key is the ``Key`` resource), or a key service
  ``unwrap``/``rewrap``/``wrap`` that succeeded for an actor that is not an identity URI (a
  local use, which no decision precedes; a broker's own operation follows its decision);
- a pull (``is_pull``): an allowed ``pull`` decision (every manifest and blob request is one);
- an artifact touched (``touched_item``): the ``Repository`` of an allowed ``pull``, the
  ``Artifact`` of an allowed ``artifact.pull``, the artifact id of a local ``unwrap``;
- a failure (``is_failure``): a denied decision or a key operation whose result is an
  error, except the results a detector ignores.

Pure: no I/O and no clock; times are the events' own.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelseal.keys.config import ConfigError
from modelseal.telemetry.secevents import SecurityEvent

SEVERITIES = ("warning", "critical")
Row = dict[str, Any]
MAX_EVIDENCE = 20  # audit entries an alert carries
DAY = 86400.0
HOUR = 3600.0
KEY_ACTIONS = ("key.unwrap", "key.rewrap", "key.wrap")
KEY_OPS = ("unwrap", "rewrap", "wrap")
SEP = "\x1f"  # between the parts of an entity name: no identity or key name holds it


@dataclass(frozen=True)
class Detection:
    """One finding. ``subject``: any of identity, key, source, artifact; ``evidence``: the
    audit entries behind it (a TLS event has none); ``time``: when it is reported (the event
    that completed it, or the end of a hold for correlation, ``telemetry.correlate``);
    ``dedupe``: what makes two detections the same incident (with the detector name)."""

    detector: str
    severity: str
    subject: dict[str, str]
    summary: str
    evidence: tuple[int, ...]
    time: float
    dedupe: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "severity": self.severity,
            "subject": dict(self.subject),
            "summary": self.summary,
            "evidence": list(self.evidence),
            "time": self.time,
            "dedupe": self.dedupe,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Detection:
        subject = doc.get("subject")
        evidence = doc.get("evidence")
        if not isinstance(subject, dict) or not isinstance(evidence, list):
            raise ValueError("not a detection")
        return cls(
            detector=str(doc["detector"]),
            severity=str(doc["severity"]),
            subject={str(k): str(v) for k, v in subject.items()},
            summary=str(doc["summary"]),
            evidence=tuple(int(n) for n in evidence),
            time=float(doc["time"]),
            dedupe=str(doc.get("dedupe", "")),
        )


# -- per-entity state ------------------------------------------------------------------


class Table:
    """Entity -> row, at most ``cap`` rows: touching a row makes it the most recent; the
    oldest beyond the cap is evicted. ``take`` returns the changed rows and the evicted
    entities since the last call, each changed row with its order (``ord``: higher is more
    recent), so a table reloaded from them (``load``) evicts in the same order."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.rows: OrderedDict[str, Row] = OrderedDict()
        self._ord: dict[str, int] = {}
        self._tick = 0
        self._changed: set[str] = set()
        self._evicted: set[str] = set()

    def get(self, entity: str) -> Row | None:
        return self.rows.get(entity)

    def touch(self, entity: str, row: Row) -> Row:
        """Store ``row`` for ``entity`` (changed, most recent); evict beyond the cap."""
        self.rows[entity] = row
        self.rows.move_to_end(entity)
        self._tick += 1
        self._ord[entity] = self._tick
        self._changed.add(entity)
        self._evicted.discard(entity)
        while len(self.rows) > self.cap:
            old, _ = self.rows.popitem(last=False)
            self._ord.pop(old, None)
            self._changed.discard(old)
            self._evicted.add(old)
        return row

    def remove(self, entity: str) -> None:
        """Forget ``entity`` (reported with the evicted ones at the next ``take``)."""
        if self.rows.pop(entity, None) is not None:
            self._ord.pop(entity, None)
            self._changed.discard(entity)
            self._evicted.add(entity)

    def take(self) -> tuple[dict[str, tuple[int, Row]], set[str]]:
        changed = {e: (self._ord[e], self.rows[e]) for e in self._changed if e in self.rows}
        evicted = self._evicted
        self._changed, self._evicted = set(), set()
        return changed, evicted

    def load(self, rows: Iterable[tuple[str, int, Row]]) -> None:
        """Rows as stored: (entity, ord, row), in any order."""
        self.rows.clear()
        self._ord.clear()
        for entity, order, row in sorted(rows, key=lambda r: r[1]):
            self.rows[entity] = row
            self._ord[entity] = order
        self._tick = max(self._ord.values(), default=0)
        while len(self.rows) > self.cap:
            old, _ = self.rows.popitem(last=False)
            self._ord.pop(old, None)
            self._evicted.add(old)
        self._changed = set()


def remember(items: list[Any], item: Any, cap: int) -> bool:
    """Put ``item`` last in ``items`` (at most ``cap``, oldest dropped); True if it was new."""
    new = item not in items
    if not new:
        items.remove(item)
    items.append(item)
    del items[:-cap]
    return new


def add_evidence(row: Row, entry: int | None, cap: int = MAX_EVIDENCE) -> None:
    if entry is not None:
        ev = row.setdefault("ev", [])
        ev.append(entry)
        del ev[:-cap]


# -- EWMA baseline of a count per bucket ------------------------------------------------


def alpha_of(bucket: float, half_life: float) -> float:
    """The EWMA weight of one bucket for a baseline that halves its memory in ``half_life``."""
    return 1.0 - float(0.5 ** (bucket / half_life))


def new_baseline(bucket: int) -> Row:
    """``b``: the current bucket; ``n``: its count; ``m``/``v``: mean and variance of the
    closed buckets; ``p``: their peak, decaying like the mean; ``k``: buckets closed;
    ``f``: the bucket that last fired, ``c``: the threshold it crossed."""
    return {"b": bucket, "n": 0, "m": 0.0, "v": 0.0, "p": 0.0, "k": 0, "f": -1}


def roll(row: Row, bucket: int, alpha: float) -> None:
    """Close the buckets up to ``bucket`` (an event in an earlier one counts in the current)."""
    gap = bucket - int(row["b"])
    if gap <= 0:
        return
    m, v = float(row["m"]), float(row["v"])
    n = float(row["n"])
    if row["f"] == row["b"]:  # a bucket that fired counts as its threshold: an incident is not a baseline
        n = min(n, float(row.get("c", n)))
    d = n - m  # the bucket that closes
    inc = alpha * d
    m, v = m + inc, (1.0 - alpha) * (v + d * inc)
    peak = max(n, float(row.get("p", 0.0)) * (1.0 - alpha))
    empty = gap - 1  # then that many empty buckets, in closed form
    if empty:
        decay = (1.0 - alpha) ** empty
        v = decay * (v + m * m * (1.0 - decay))
        m, peak = decay * m, decay * peak
    row.update(b=bucket, n=0, m=m, v=v, p=peak, k=int(row["k"]) + gap)
    row.pop("ev", None)


def corrected(row: Row, alpha: float) -> tuple[float, float]:
    """Mean and variance with the start-up bias removed: both begin at 0, so after ``k``
    buckets they carry only ``1 - (1 - alpha)^k`` of the weight (as Adam corrects its moments)."""
    weight = 1.0 - (1.0 - alpha) ** int(row["k"])
    if weight <= 0.0:
        return 0.0, 0.0
    return float(row["m"]) / weight, max(0.0, float(row["v"])) / weight


def threshold(row: Row, alpha: float, k: float, floor: float, peak_factor: float = 0.0) -> float:
    """``max(floor, mean + k * sd, peak_factor * peak)`` of the bias-corrected baseline."""
    m, v = corrected(row, alpha)
    return max(floor, m + k * math.sqrt(v), peak_factor * float(row.get("p", 0.0)))


# -- a burst: N events within a window ----------------------------------------------------


def burst(row: Row, t: float, entry: int | None, n: int, window: float) -> bool:
    """Record an event at ``t``; True (and the window emptied) when the last ``n`` events
    fall within ``window`` seconds. ``row["t"]`` keeps at most ``n`` times."""
    times: list[float] = row.setdefault("t", [])
    times.append(t)
    del times[:-n]
    add_evidence(row, entry)
    if len(times) >= n and times[-1] - times[0] <= window:
        times.clear()
        return True
    return False


# -- parameters -----------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A detector's name, default severity and parameter defaults (every one a number,
    except where the default is a list of strings or a bool); ``low``/``high`` bound them."""

    name: str
    severity: str
    defaults: Mapping[str, Any]
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    doc: str = ""


COMMON = {"enabled": True, "dedupe": 3600.0, "max_entities": 10000}
_COMMON_BOUNDS = {"dedupe": (0.0, 7 * 86400.0), "max_entities": (10.0, 1_000_000.0)}


class Params:
    """``spec``'s defaults overridden by ``table`` (``[monitor.detectors.NAME]``): an unknown
    key, a wrong type or a number out of bounds is a ConfigError naming the setting."""

    def __init__(self, spec: Spec, table: Mapping[str, Any] | None = None) -> None:
        table = dict(table or {})
        where = f"monitor.detectors.{spec.name}"
        allowed = {**COMMON, **spec.defaults, "severity": spec.severity}
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise ConfigError(f"config: [{where}] has unknown setting(s) {', '.join(unknown)[:200]}")
        self.values: dict[str, Any] = {}
        bounds = {**_COMMON_BOUNDS, **spec.bounds}
        for name, default in allowed.items():
            value = table.get(name, default)
            self.values[name] = _checked(f"{where}.{name}", value, default, bounds.get(name))

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def num(self, name: str) -> float:
        return float(self.values[name])


def _checked(where: str, value: Any, default: Any, bounds: tuple[float, float] | None) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config: {where} must be true or false")
        return value
    if isinstance(default, str):
        if where.endswith(".severity"):
            if value not in SEVERITIES:
                raise ConfigError(f"config: {where} must be one of {', '.join(SEVERITIES)}")
            return value
        if not isinstance(value, str) or len(value) > 200:
            raise ConfigError(f"config: {where} must be a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or len(value) > 1000 or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config: {where} must be a list of strings")
        return list(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"config: {where} must be a number")
    low, high = bounds if bounds is not None else (0.0, math.inf)
    if not low <= value <= high:
        raise ConfigError(f"config: {where} must be from {low:g} to {high:g}")
    return value


# -- what counts as what -----------------------------------------------------------------


def principal(ev: SecurityEvent) -> str | None:
    return ev.actor if ev.actor and ev.actor != "?" else None


def key_use(ev: SecurityEvent) -> str | None:
    """The key ``ev`` used successfully, if it is a key use (module docstring)."""
    if ev.kind != "audit" or ev.outcome != "success":
        return None
    if ev.operation == "authorize":
        if ev.action in KEY_ACTIONS and ev.resource and ev.resource.startswith("Key:"):
            return ev.resource[4:]
        return None
    if ev.operation in KEY_OPS and ev.key and ev.actor and not ev.actor.startswith("spiffe://"):
        return ev.key
    return None


def is_pull(ev: SecurityEvent) -> bool:
    return ev.operation == "authorize" and ev.action == "pull" and ev.outcome == "success"


def touched_item(ev: SecurityEvent) -> str | None:
    """The artifact or repository ``ev`` read, for the exfiltration detector."""
    if ev.kind != "audit" or ev.outcome != "success":
        return None
    if ev.operation == "authorize" and ev.action in ("pull", "artifact.pull") and ev.resource:
        return ev.resource
    if ev.operation == "unwrap" and ev.artifact and ev.actor and not ev.actor.startswith("spiffe://"):
        return f"artifact:{ev.artifact}"
    return None


def is_failure(ev: SecurityEvent, ignore: list[str]) -> bool:
    """A denied decision or failed key operation whose result is not in ``ignore`` (``X*``: a prefix)."""
    if ev.kind != "audit" or ev.outcome == "success":
        return False
    if ev.operation != "authorize" and ev.operation not in KEY_OPS:
        return False
    for pattern in ignore:
        if ev.result == pattern or (pattern.endswith("*") and ev.result.startswith(pattern[:-1])):
            return False
    return True


@functools.lru_cache(maxsize=8192)
def network_of(source: str, v4: int, v6: int) -> str:
    """The network a source belongs to for novelty (an address's /``v4``, a /64's /``v6``)."""
    try:
        net = ipaddress.ip_network(source, strict=False)
    except ValueError:
        return source
    prefix = v4 if net.version == 4 else v6
    return str(net.supernet(new_prefix=prefix)) if net.prefixlen > prefix else str(net)


# -- the detector ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a detector knows beyond the event: ``start``, when the monitor saw its first
    event; ``first``, when it first saw this event's principal (``start`` if none)."""

    start: float
    first: float


class Detector:
    """One detector: ``SPEC`` (name, severity, parameter defaults), its ``tables``."""

    SPEC: Spec

    def __init__(self, params: Params) -> None:
        self.p = params
        self.name = self.SPEC.name
        self.severity: str = params["severity"]
        self.tables: dict[str, Table] = {"": Table(int(params.num("max_entities")))}

    @property
    def table(self) -> Table:
        return self.tables[""]

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        """The detections ``ev`` completes."""
        raise NotImplementedError

    def found(
        self, ev: SecurityEvent, subject: dict[str, str], summary: str, row: Row | None, dedupe: str
    ) -> Detection:
        evidence = tuple(row.get("ev", [])) if row is not None else ()
        if ev.entry is not None and ev.entry not in evidence:
            evidence = (*evidence, ev.entry)
        clean = {k: v for k, v in subject.items() if v}
        return Detection(self.name, self.severity, clean, summary, evidence, ev.time, dedupe)


__all__ = ["DAY", "HOUR", "MAX_EVIDENCE", "SEP", "SEVERITIES", "Context", "Detection", "Detector", "Params", "Row"]
__all__ += ["Spec", "Table", "add_evidence", "alpha_of", "burst", "corrected", "is_failure", "is_pull", "key_use"]
__all__ += ["network_of", "new_baseline", "principal", "remember", "roll", "threshold", "touched_item"]
