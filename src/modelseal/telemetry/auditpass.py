"""The audit part of the metrics pass: the audit log verified incrementally, and the last
backup and restore drill (docs/monitoring.md, "Metrics").

``AuditPass`` keeps what its last verification of the log covered (the size and the Merkle
frontier there) and on each pass checks only the entries written since, against it
(``MerkleAuditLog.verify_from``: the log still holds the verified entries and what this
host last wrote, every new head is recomputed on from the frontier, every new signature
checked), a batch of rows at a time: the cost of a pass is the entries since the last one,
not the log. A full verification, from the first entry, runs at the first pass (a worker
that starts) and then every ``[monitor] full_verify_interval`` (default 24 h): an old entry
edited in place with its stored head left as it was is found by a full pass, not by the
incremental ones. The entries that verify are scanned as they are read for the last
``backup-create`` and ``backup-drill`` with result ``ok`` (a bounded read of what is new,
never every event in memory).

The figures fail closed: ``modelseal_audit_log_verified`` is 1 when the last check passed
and 0 when it failed *or could not run* (``figures`` after an exception: a database that
cannot be read, a malformed audit key; a log that cannot be verified does not verify), and
``modelseal_audit_log_last_verification_timestamp_seconds`` is the time of the last check
that passed (0 until one has), kept when later ones fail, so that the staleness alert
fires. The backup times are those of the entries verified so far. After a full
verification that fails, every pass is a full one until one passes (the log is no longer
trusted from any frontier; a full pass over a log that is broken stops at its first bad
entry); after an incremental one that fails, the next goes on from the same frontier.

A source without ``verify_from`` (``modelseal metrics --textfile``'s, which reads every
event anyway to count them) is verified whole with ``verified_events``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from modelseal.audit.merkle import Frontier
from modelseal.telemetry.collect import Family
from modelseal.util.bounded import json_loads

FULL_VERIFY = 86400.0  # [monitor] full_verify_interval
BACKUPS = (
    ("backup-create", "modelseal_backup_last_success_timestamp_seconds", "backup"),
    ("backup-drill", "modelseal_backup_drill_last_success_timestamp_seconds", "restore drill"),
)
_OPS = {op for op, _, _ in BACKUPS}


def _time(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def last_ok(events: Iterable[dict[str, Any]], operation: str) -> float | None:
    """The latest time of an ``operation`` event with result ``ok`` among ``events``."""
    good = [
        t
        for e in events
        if e.get("operation") == operation and e.get("result") == "ok" and (t := _time(e.get("time"))) is not None
    ]
    return max(good) if good else None


def _bad(_why: str) -> ValueError:
    return ValueError(_why)


def scan_backups(rows: Iterable[tuple[Any, ...]], seen: dict[str, float]) -> None:
    """Move ``seen`` (operation -> latest time) to the backups and drills in ``rows``."""
    for row in rows:
        body = row[1]
        if '"backup-' not in body:  # most rows: not parsed at all
            continue
        try:
            doc = json_loads(body.encode(), max_depth=4, max_values=4096, error=_bad)
        except ValueError:
            continue
        op = doc.get("operation") if isinstance(doc, dict) else None
        if op in _OPS and doc.get("result") == "ok" and (t := _time(doc.get("time"))) is not None:
            seen[op] = max(t, seen.get(op, t))


@dataclass
class AuditPass:
    """The audit part's state between passes (module docstring)."""

    full_every: float = FULL_VERIFY
    frontier: Frontier | None = None  # what the last verification that passed covered
    full_at: float | None = None  # when the last full verification ran
    verified_at: float | None = None  # when a check last passed
    ok: bool = False
    present: bool = False  # there is a log to verify
    backups: dict[str, float] = field(default_factory=dict)
    fulls: int = 0  # full verifications run (tests)

    def families(self, src: Any, now: float) -> list[Family]:
        """Check the log of ``src.audit`` and return the figures; raises what the check
        raises (the caller then publishes ``figures()``: verified 0)."""
        audit = src.audit
        verify_from = getattr(audit, "verify_from", None)
        whole = getattr(audit, "verified_events", None)
        if audit is None or (verify_from is None and whole is None):
            self.present = False
            return []
        self.present, self.ok = True, False  # until the check passes
        if verify_from is None:
            assert whole is not None
            events, v = whole()
            self.backups = {op: t for op in _OPS if (t := last_ok(events, op)) is not None}
        else:
            full = self.frontier is None or self.full_at is None or now - self.full_at >= self.full_every
            seen: dict[str, float] = {} if full else dict(self.backups)
            v, frontier = verify_from(None if full else self.frontier, on_rows=lambda rows: scan_backups(rows, seen))
            if full:
                self.full_at, self.fulls = now, self.fulls + 1
            if v.ok:
                self.frontier, self.backups = frontier, seen
            elif full:  # no frontier is trusted any more: the next checks are full ones, until one passes
                self.frontier = None
        self.ok = bool(v.ok)
        if self.ok:
            self.verified_at = now
        return self.figures()

    def figures(self) -> list[Family]:
        """The part's figures as they stand (after a check, or after one that raised)."""
        if not self.present:
            return []
        out = [
            Family(
                "modelseal_audit_log_verified",
                "1 if the audit log verified at the last check, else 0 (also when it could not be checked).",
                (),
                (((), 1.0 if self.ok else 0.0),),
            ),
            Family(
                "modelseal_audit_log_last_verification_timestamp_seconds",
                "Time the audit log last verified (0: not since this process started).",
                (),
                (((), self.verified_at or 0.0),),
            ),
        ]
        for op, name, what in BACKUPS:
            if op in self.backups:
                samples = (((), self.backups[op]),)
                out.append(Family(name, f"Time of the last successful {what} (audit log).", (), samples))
        return out


__all__ = ["BACKUPS", "FULL_VERIFY", "AuditPass", "last_ok", "scan_backups"]
