"""The result of ``modelseal controls test``: one row per attempt, the verdict rule, the table,
the JSON, and the evidence record (docs/controls.md, "Evidence").

A row is **PASS** when the attempt was refused (where a refusal is expected) and every
expected alert fired: the counters the matching Prometheus rules watch moved by at least the
expected amount, and the expected detector alerts were written to the server's audit log
after the attempt started. **FAIL** when it went through, when nothing could tell (an error),
or when an alert is missing. **NOT TESTED** when the attempt cannot be made here (no CA on
this host, no TOTP secret, no push permission on the controls repository, ...): never a pass.

``record`` writes the report as JSON under ``$MODELSEAL_HOME/evidence/controls/``
(``util.files.write_atomic``, 0600) and then a ``controls-test`` audit event whose result is
``pass`` or ``fail`` and whose ``artifact`` field is the record's SHA-256, so the
tamper-evident audit log vouches for the file (issue 15's evidence export collects both).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.util.files import write_atomic

PASS, FAIL, NOT_TESTED = "PASS", "FAIL", "NOT TESTED"
RECORD_FORMAT = "modelseal-controls-test/v1"
EVIDENCE_DIR = ("evidence", "controls")
# The attempts, in the order they run (telemetry.controls.EXPECT says what each expects).
ATTEMPTS = (
    "no-certificate",
    "other-ca",
    "expired-certificate",
    "tls-1.2",
    "pin-mismatch",
    "plaintext-push",
    "reader-rotate",
    "otp-replay",
    "unwrap-burst",
)


@dataclass(frozen=True)
class MetricDelta:
    """A counter (a sample name and a subset of its labels, summed over the rest) that must move
    by ``at_least``; ``alert``: the Prometheus rule of deploy/prometheus/alerts.yml it feeds."""

    name: str
    labels: tuple[tuple[str, str], ...]
    at_least: float
    alert: str

    def shown(self) -> str:
        inner = ",".join(f'{k}="{v}"' for k, v in self.labels)
        return f"{self.name}{{{inner}}}" if inner else self.name


@dataclass
class Row:
    """One attempt: what was expected, what was seen, the verdict."""

    attempt: str
    title: str
    refusal: str  # the refusal expected, one line
    refused: bool | None = None
    refusal_expected: bool = True
    tested: bool = True
    detail: str = ""
    started: float = 0.0
    metrics: list[dict[str, Any]] = field(default_factory=list)  # {"metric", "alert", "expected", "delta"}
    detectors: list[dict[str, Any]] = field(default_factory=list)  # {"detector", "entry" | None}
    local_alert: bool | None = None  # an attempt's own check (the client's pin-mismatch event)
    verdict: str = ""

    def alerted(self) -> bool:
        ok = all(m["delta"] is not None and m["delta"] >= m["expected"] for m in self.metrics)
        ok = ok and all(d["entry"] is not None for d in self.detectors)
        return ok and self.local_alert is not False and bool(self.metrics or self.detectors or self.local_alert)

    def judge(self) -> str:
        if not self.tested:
            self.verdict = NOT_TESTED
        elif self.refusal_expected and not self.refused:  # went through, or no answer either way
            self.verdict = FAIL
        else:
            self.verdict = PASS if self.alerted() else FAIL
        return self.verdict

    def missing(self) -> str:
        """What alert did not fire, one line ("" when none is missing)."""
        gone = [f"{m['metric']} moved {m['delta'] or 0:g} < {m['expected']:g}" for m in self.metrics if not _met(m)]
        gone += [f"no {d['detector']} alert" for d in self.detectors if d["entry"] is None]
        if self.local_alert is False:
            gone.append("no local audit event")
        return "; ".join(gone)


def _met(m: dict[str, Any]) -> bool:
    return m["delta"] is not None and m["delta"] >= m["expected"]


@dataclass
class Report:
    registry: str
    identity: str
    started: float
    rows: list[Row]
    finished: float = 0.0

    @property
    def result(self) -> str:
        return "fail" if any(r.verdict == FAIL for r in self.rows) else "pass"

    def not_tested(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == NOT_TESTED]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "registry": self.registry,
            "identity": self.identity,
            "started": self.started,
            "finished": self.finished,
            "result": self.result,
            "counts": {v: sum(r.verdict == v for r in self.rows) for v in (PASS, FAIL, NOT_TESTED)},
            "attempts": [asdict(r) for r in self.rows],
        }


def _yes(value: bool | None, expected: bool = True) -> str:
    if value is None:
        return "-"
    if not expected:
        return "no (allowed)" if not value else "yes"
    return "yes" if value else "NO"


def table(report: Report) -> str:
    """The report as a table: attempt, refused?, alert?, verdict, one-line detail (bounded)."""
    head = f"{'attempt':<22} {'refused?':<13} {'alert?':<7} {'verdict':<11} detail"
    lines = [head, "-" * 100]
    for r in report.rows:
        tested = r.tested and r.verdict != NOT_TESTED
        refused = _yes(r.refused, r.refusal_expected) if tested else "-"
        alert = ("yes" if r.alerted() else "NO") if tested and r.refused is not None else "-"
        detail = r.detail if r.verdict != FAIL or not r.missing() else f"{r.missing()}; {r.detail}"
        lines.append(f"{r.attempt:<22} {refused:<13} {alert:<7} {r.verdict:<11} {detail}")
    counts = report.to_json()["counts"]
    lines.append(
        f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[NOT_TESTED]} not tested"
        f" against {report.registry} as {report.identity}"
    )
    return "\n".join(lines)


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False).encode() + b"\n"


def record(report: Report, home: Path, sink: AuditSink) -> tuple[Path, str]:
    """Write the evidence record and its ``controls-test`` audit event; (path, sha256 hex)."""
    folder = home.joinpath(*EVIDENCE_DIR)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = dt.datetime.fromtimestamp(report.started, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"controls-{stamp}-{secrets.token_hex(4)}.json"
    data = canonical(report.to_json())
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(path, data, mode=0o600, exclusive=True)
    key = "evidence:" + "/".join((*EVIDENCE_DIR, path.name))
    sink.emit(AuditEvent("controls-test", key, report.result, artifact=digest, actor=report.identity))
    return path, digest


def summary_line(rows: Sequence[Row]) -> str:
    """The loud line about attempts not tested ("" when every one was)."""
    missed = [r.attempt for r in rows if r.verdict == NOT_TESTED]
    if not missed:
        return ""
    return f"controls test: {len(missed)} of {len(rows)} attempts NOT TESTED ({', '.join(missed)}): not a pass"


__all__ = [
    "ATTEMPTS",
    "FAIL",
    "NOT_TESTED",
    "PASS",
    "RECORD_FORMAT",
    "MetricDelta",
    "Report",
    "Row",
    "record",
    "summary_line",
]
__all__ += ["canonical", "table"]
