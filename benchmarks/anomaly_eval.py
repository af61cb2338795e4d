"""Evaluate the anomaly detectors on the labelled synthetic trace (benchmarks/anomaly_trace.py).

    python benchmarks/anomaly_eval.py [--days 30] [--principals 50] [--seed 1] [--grace 3600] [--false] [--missed]

Feeds the trace through the pure detectors and the correlation (``telemetry.correlate.
Pipeline``, default configuration unless ``config`` is given), then matches each detection
to the incidents it can be about: the same identity or source as the incident's subject,
reported between the incident's start and ``grace`` seconds after its end. A detection that
matches no incident is a false alert. Prints, per detector and overall: incidents of its
kind and how many it detected (recall), its detections and how many matched an incident
(precision), false alerts per day, and the median and 95th percentile of the time to
detect (from the incident's start to the first matching detection). Overall recall counts
an incident detected by any detector. ``--false`` lists the false alerts, ``--missed`` the incidents no detector found.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anomaly_trace import DAY, EXPECTED, Incident, Trace

from modelseal.telemetry.correlate import Pipeline
from modelseal.telemetry.detectbase import Detection


@dataclass
class Result:
    days: float
    events: int
    seconds: float
    incidents: list[Incident]
    detections: list[Detection]
    matched: dict[int, list[Incident]]  # detection index -> incidents it matches
    ttd: dict[tuple[str, str], float]  # (incident id, detector) -> time to detect

    def false(self) -> list[Detection]:
        return [d for i, d in enumerate(self.detections) if not self.matched[i]]


def matches(d: Detection, inc: Incident, grace: float) -> bool:
    if not inc.start <= d.time <= inc.end + grace:
        return False
    return any(d.subject.get(k) == v for k, v in inc.subject.items())


def run(trace: Trace, config: Mapping[str, Any] | None = None, grace: float = 3600.0) -> Result:
    pipe = Pipeline(config)
    detections: list[Detection] = []
    n, last = 0, 0.0
    t0 = time.perf_counter()
    for ev in trace.events():
        n += 1
        last = ev.time
        detections.extend(pipe.feed(ev))
    detections.extend(pipe.flush(last + DAY))
    seconds = time.perf_counter() - t0
    matched: dict[int, list[Incident]] = {}
    ttd: dict[tuple[str, str], float] = {}
    for i, d in enumerate(detections):
        matched[i] = [inc for inc in trace.incidents if matches(d, inc, grace)]
        for inc in matched[i]:
            key = (inc.id, d.detector)
            ttd[key] = min(ttd.get(key, float("inf")), d.time - inc.start)
    return Result(trace.days, n, seconds, trace.incidents, detections, matched, ttd)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def table(r: Result) -> list[dict[str, Any]]:
    """One row per detector and an overall one."""
    rows = []
    for detector in sorted(set(EXPECTED.values())):
        kinds = [k for k, v in EXPECTED.items() if v == detector]
        mine = [inc for inc in r.incidents if inc.kind in kinds]
        found = [inc for inc in mine if (inc.id, detector) in r.ttd]
        dets = [i for i, d in enumerate(r.detections) if d.detector == detector]
        true = [i for i in dets if r.matched[i]]
        times = [r.ttd[(inc.id, detector)] for inc in found]
        rows.append(_row(detector, len(mine), len(found), len(dets), len(true), times, r.days))
    for detector in sorted({d.detector for d in r.detections} - set(EXPECTED.values())):
        dets = [i for i, d in enumerate(r.detections) if d.detector == detector]  # no kind of its own
        true = [i for i in dets if r.matched[i]]
        rows.append(_row(detector, 0, 0, len(dets), len(true), [], r.days))
    any_found = {inc_id for inc_id, _ in r.ttd}
    times = [min(v for (i, _), v in r.ttd.items() if i == inc.id) for inc in r.incidents if inc.id in any_found]
    true = sum(1 for i in r.matched if r.matched[i])
    rows.append(_row("overall", len(r.incidents), len(any_found), len(r.detections), true, times, r.days))
    return rows


def _row(name: str, n: int, found: int, dets: int, true: int, times: list[float], days: float) -> dict[str, Any]:
    return {
        "detector": name,
        "incidents": n,
        "detected": found,
        "recall": found / n if n else float("nan"),
        "detections": dets,
        "precision": true / dets if dets else float("nan"),
        "false_per_day": (dets - true) / days,
        "ttd_median_s": statistics.median(times) if times else float("nan"),
        "ttd_p95_s": _pct(times, 0.95),
    }


def render(rows: Iterable[dict[str, Any]]) -> str:
    head = f"{'detector':<22} {'inc':>4} {'det':>4} {'recall':>6} {'alerts':>6} {'prec':>5} {'false/d':>7}"
    head += f" {'ttd med':>8} {'ttd p95':>8}"
    lines = [head]
    for x in rows:
        lines.append(
            f"{x['detector']:<22} {x['incidents']:>4} {x['detected']:>4} {x['recall']:>6.2f} {x['detections']:>6}"
            f" {x['precision']:>5.2f} {x['false_per_day']:>7.2f} {x['ttd_median_s']:>7.0f}s {x['ttd_p95_s']:>7.0f}s"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--principals", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grace", type=float, default=3600.0)
    ap.add_argument("--false", action="store_true", help="list the false alerts")
    ap.add_argument("--missed", action="store_true", help="list the incidents no detector found")
    args = ap.parse_args()
    r = run(Trace(args.days, args.principals, args.seed), grace=args.grace)
    print(f"{r.events} events, {len(r.incidents)} incidents, {args.days} days, {args.principals} principals")
    print(f"detectors: {r.events / r.seconds:,.0f} events/s ({r.seconds:.1f} s)")
    print(render(table(r)))
    if args.false:
        for d in r.false():
            print(f"FALSE {d.time:.0f} {d.detector}: {d.summary}")
    if args.missed:
        found = {i for i, _ in r.ttd}
        for inc in r.incidents:
            if inc.id not in found:
                print(f"MISSED {inc.id} {inc.kind} {inc.start:.0f}-{inc.end:.0f} {inc.subject}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
