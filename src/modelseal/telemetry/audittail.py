"""Following the audit log incrementally, verified (docs/monitoring.md, "Anomaly detection").

``MerkleAuditLog.verified_events`` verifies the whole log on every call: measured here,
about 0.5 ms an entry (SHA-256 of each event, its tree head, an Ed25519 signature check),
so 20,000 entries took 11 s, too slow for a 5 s cadence. ``AuditTail`` verifies only the
entries after the monitor's cursor instead: the cursor keeps the Merkle frontier
(``audit.merkle.Frontier``) at the last entry it verified, and each read takes at most
``batch`` new rows (``AuditStore.rows_after``, without the append lock), checks that the
row at the cursor still has the tree head the frontier gives (the verified prefix was not
rewritten under it), then checks the new rows exactly as an append does
(``audit.checks.check_rows``: every head recomputed, every signature by a trusted audit
key). The rows before the first that fails are returned and the cursor stops there; the
failure is named (``Tail.problem``) and the monitor goes no further until the log is
repaired: ``modelseal audit verify`` names the entry, the metrics' full verification
(``modelseal_audit_log_verified``) alerts. The whole-log checks (this host's record of its
last write, a checkpoint) remain ``audit verify``'s and the metrics pass's.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelseal.audit import merkle
from modelseal.audit.checks import check_rows
from modelseal.audit.store import Row
from modelseal.util.bounded import json_loads

BATCH = 5000


class FollowedLog(Protocol):
    """What ``AuditTail`` needs of ``audit.log.MerkleAuditLog``."""

    @property
    def store(self) -> Any: ...

    def trusted_keys(self) -> dict[str, Ed25519PublicKey]: ...


@dataclass(frozen=True)
class AuditCursor:
    """The last entry verified (``seq``), the frontier there, and whether an entry up to
    there named its signer (after one does, every later one must)."""

    seq: int = 0
    hashes: tuple[str, ...] = ()
    named: bool = False

    def frontier(self) -> merkle.Frontier:
        return merkle.Frontier.restore(self.seq, [bytes.fromhex(h) for h in self.hashes])

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "hashes": list(self.hashes), "named": self.named}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> AuditCursor:
        if not text:
            return cls()
        doc = json_loads(text.encode(), max_depth=3, max_values=200, error=ValueError)
        if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int) or not isinstance(doc.get("hashes"), list):
            raise ValueError("not an audit cursor")
        cursor = cls(int(doc["seq"]), tuple(str(h) for h in doc["hashes"]), bool(doc.get("named")))
        cursor.frontier()  # ValueError if the hashes do not fit the size
        return cursor

    def advance(self, entries: list[Entry]) -> AuditCursor:
        """The cursor after ``entries`` (the next ones, in order, already verified)."""
        if not entries:
            return self
        f = self.frontier()
        named = self.named
        for e in entries:
            f.append(merkle.leaf_hash(e.body.encode()))
            named = named or e.named
        return AuditCursor(f.size, tuple(h.hex() for h in f.hashes()), named)


@dataclass(frozen=True)
class Entry:
    seq: int
    body: str
    event: dict[str, Any]  # the parsed event, with "entry": seq
    named: bool

    @property
    def time(self) -> float:
        t = self.event.get("time")
        return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else 0.0


@dataclass
class Tail:
    entries: list[Entry] = field(default_factory=list)
    more: bool = False  # a full batch: more rows may follow
    problem: str | None = None


def _entry(row: Row) -> Entry | None:
    seq, body = row[0], row[1]
    try:
        doc = json_loads(body.encode(), max_depth=4, max_values=4096, error=ValueError)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return None
    return Entry(seq, body, {**doc, "entry": seq}, "signer" in doc)


class AuditTail:
    """Read the verified entries after a cursor (module docstring)."""

    def __init__(self, log: FollowedLog, batch: int = BATCH) -> None:
        self.log, self.batch = log, batch

    def read(self, cursor: AuditCursor) -> Tail:
        store = self.log.store
        start = max(cursor.seq - 1, 0)
        rows: list[Row] = store.rows_after(start, self.batch + (1 if cursor.seq else 0))
        if cursor.seq:
            if not rows or rows[0][0] != cursor.seq or not hmac.compare_digest(rows[0][3], cursor.frontier().root()):
                return Tail(problem=f"entry {cursor.seq}, the last the monitor verified, was changed or removed")
            rows = rows[1:]
        if not rows:
            return Tail()
        more = len(rows) >= self.batch
        trusted = self.log.trusted_keys()
        v, _, _ = check_rows(rows, trusted, cursor.frontier(), named=cursor.named, unknown_ok=len(trusted) <= 1)
        problem = None
        if not v.ok:
            bad = v.first_bad if v.first_bad is not None else rows[0][0]
            rows = [r for r in rows if r[0] < bad]
            problem, more = v.reason or f"entry {bad} does not verify", False
        entries: list[Entry] = []
        for row in rows:
            e = _entry(row)
            if e is None:  # verified yet unreadable: stop before it, like a bad row
                return Tail(entries, False, f"entry {row[0]} is not a readable audit event")
            entries.append(e)
        return Tail(entries, more, problem)


__all__ = ["BATCH", "AuditCursor", "AuditTail", "Entry", "FollowedLog", "Tail"]
