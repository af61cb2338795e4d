"""The scan's Prometheus figures in the node_exporter textfile format (``modelseal scan
--textfile PATH``): ``modelseal_scan_findings{kind}`` (every kind, 0 included, so an alert
on ``> 0`` resolves when a finding goes away), ``modelseal_artifacts{state}``,
``modelseal_scan_errors`` (what could not be read or decided: above 0 the scan is incomplete,
and an alert says so) and ``modelseal_scan_last_timestamp_seconds``. Written atomically
(``util.files.write_atomic``), so node_exporter never reads half a file. Label values are
the fixed kinds and states of ``scanmodel``: never a path, a key or an artifact id.
"""

from __future__ import annotations

import time
from pathlib import Path

from modelseal.errors import ModelsealError
from modelseal.telemetry.scanmodel import KINDS, STATES, ScanReport
from modelseal.util.files import write_atomic


def exposition(report: ScanReport, now: float | None = None) -> bytes:
    """The report's figures in the Prometheus text format."""
    try:
        from prometheus_client import CollectorRegistry, Gauge, generate_latest
    except ImportError:
        raise ModelsealError("--textfile needs prometheus-client: pip install 'modelseal[metrics]'") from None
    registry = CollectorRegistry()
    findings = Gauge(
        "modelseal_scan_findings", "Findings of the last modelseal scan, by kind", ["kind"], registry=registry
    )
    counts = report.by_kind()
    for kind in KINDS:
        findings.labels(kind=kind).set(counts[kind])
    artifacts = Gauge(
        "modelseal_artifacts",
        "Artifacts the last modelseal scan found, by protection state",
        ["state"],
        registry=registry,
    )
    for state in STATES:
        artifacts.labels(state=state).set(report.states.get(state, 0))
    errors = Gauge(
        "modelseal_scan_errors",
        "What the last modelseal scan could not read or decide (files, objects, layers, probes, whole targets):"
        " above 0, the scan is incomplete",
        registry=registry,
    )
    errors.set(report.error_count)
    last = Gauge("modelseal_scan_last_timestamp_seconds", "When the last modelseal scan finished", registry=registry)
    last.set(time.time() if now is None else now)
    return bytes(generate_latest(registry))


def write_textfile(report: ScanReport, path: Path, now: float | None = None) -> None:
    write_atomic(path, exposition(report, now), mode=0o644)


__all__ = ["exposition", "write_textfile"]
