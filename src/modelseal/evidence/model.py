"""The shape of an evidence bundle (docs/evidence.md): the window it covers, its files in
their fixed order, the items each section file holds, and the canonical JSON every file is
written in. Pure data: no I/O, no keys.

A section file is ``{"format", "section", "window", "items": {ITEM: [entries]},
"attention": {ITEM: [one-line notes]}, "gaps": [what could not be gathered]}``. Every
entry list is in a fixed order (by time, then id), so the same state gives the same bytes,
and any reordering changes the file's digest.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

from modelseal.errors import EvidenceError

BUNDLE_FORMAT = "modelseal-evidence/v1"
SECTION_FORMAT = "modelseal-evidence-section/v1"
MANIFEST_FORMAT = "modelseal-evidence-manifest/v1"
SIGNATURE_FORMAT = "modelseal-evidence-signature/v1"
# Domain separation: a signature over a bundle's manifest can never pass for an audit
# entry's, a backup manifest's or a drill record's (all made with the same host audit key).
DOMAIN = b"modelseal-evidence-manifest/v1\n"

INDEX, MANIFEST, SIGNATURE, REPORT = "index.json", "manifest.json", "manifest.sig", "report.html"
RECORDS_DIR = "records"
# Section name -> (file, title), in the bundle's order.
SECTIONS: dict[str, tuple[str, str]] = {
    "keys": ("keys.json", "Key inventory and lifecycle"),
    "certificates": ("certificates.json", "Certificates"),
    "access": ("access.json", "Access: bindings, grants and reviews"),
    "changes": ("changes.json", "Changes: policies, approvals and exceptions"),
    "tls": ("tls.json", "TLS endpoints"),
    "recovery": ("recovery.json", "Backups, drills, restores and controls tests"),
    "audit": ("audit.json", "Audit log"),
}
# Item -> its one-line title. The section is the part before the dot.
ITEMS: dict[str, str] = {
    "keys.inventory": "Keys: provider, versions, ages against the cryptoperiod (rotate_after_days); state at export",
    "keys.history": "Key lifecycle events: creation, rotation, disabling, destruction, recovery shares",
    "certificates.authority": "The certificate authority: root and issuing certificates; state at export",
    "certificates.issued": "Certificates issued in the window",
    "certificates.revoked": "Certificates revoked in the window",
    "certificates.events": "CA events: issue, renew, revoke, intermediate roll-over",
    "access.bindings": "Bindings, grants and break-glass windows active in the window (removed ones from their audit "
    "events), with review flags",
    "access.attestations": "Signed access-review attestations",
    "access.events": "Access changes: bind, grant, unbind, break-glass use, holds, MFA enrolment",
    "changes.policy_versions": "Policy versions proposed (by digest); state at export",
    "changes.activations": "Policy activations and who approved them",
    "changes.approvals": "Two-person approval requests and their outcome",
    "changes.exceptions": "Exceptions to the encryption standards, with their expiry; state at export",
    "changes.events": "Change events: approval requests and votes, policy proposals, trust overrides",
    "tls.scans": "TLS scans of the endpoints (Mozilla modern profile, certificate lifetime, pins)",
    "recovery.backups": "Backup records",
    "recovery.drills": "Restore drill records",
    "recovery.restores": "Restore records",
    "recovery.controls_tests": "Controls-test records (simulated intrusion attempts)",
    "recovery.events": "Backup, drill, restore and incident events",
    "audit.verification": "The audit log's verification, and its signed tree head",
    "audit.security_events": "Security events: anomalies, refusals, pin mismatches, replays",
}
# A record folder under $MODELSEAL_HOME/evidence (and records/ in the bundle) -> its item.
RECORD_KINDS = {
    "backups": "recovery.backups",
    "drills": "recovery.drills",
    "restores": "recovery.restores",
    "controls": "recovery.controls_tests",
}
# Items that hold the state at export, not what happened in the window (docs/evidence.md).
STATE_AT_EXPORT = frozenset(
    {"keys.inventory", "certificates.authority", "changes.policy_versions", "changes.exceptions"}
)
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_FILE = 64 << 20  # one bundle file, read back by verify
MAX_NOTES = 200  # attention notes per item; the rest are counted in one more note


def canonical(doc: Any) -> bytes:
    """Sorted keys, an indent for people, ASCII only, no NaN: one byte string per document."""
    return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False, ensure_ascii=True).encode() + b"\n"


def section_file(section: str) -> str:
    return SECTIONS[section][0]


def fixed_files() -> list[str]:
    """The files before the records, in order."""
    return [INDEX, *(f for f, _ in SECTIONS.values())]


def file_order(records: list[str]) -> list[str]:
    """Every file the manifest lists, in the one order it lists them."""
    return [*fixed_files(), *sorted(records), REPORT]


# -- the window --------------------------------------------------------------------------


def parse_time(text: str, *, end: bool = False) -> float:
    """``YYYY-MM-DD`` (a UTC day: its start, or with ``end`` the start of the next day, so
    ``--to`` includes the day) or ISO 8601 with an offset (``Z``, ``+02:00``). A time of day
    without an offset is refused: no reader should guess which zone it meant."""
    text = text.strip()
    day = re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) is not None
    try:
        if day:
            value = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
        else:
            value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise EvidenceError(f"{text[:40]!r} is not a date (2026-01-31) or an ISO 8601 time with an offset") from None
    if value.tzinfo is None:
        raise EvidenceError(f"{text[:40]!r} has no offset: add Z or +HH:MM, or give a date alone")
    try:
        if end and day:  # a date: the window ends at the next midnight
            value += dt.timedelta(days=1)
        return value.timestamp()
    except (OverflowError, OSError, ValueError):
        raise EvidenceError(f"{text[:40]!r} is outside the dates this host can represent") from None


def utc(ts: float | None) -> str:
    if ts is None:
        return ""
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


@dataclass(frozen=True)
class Window:
    """``[start, end)`` in POSIX seconds."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not self.start < self.end:
            raise EvidenceError("the window is empty: --from must be before --to")

    @classmethod
    def parse(cls, start: str, end: str) -> Window:
        return cls(parse_time(start), parse_time(end, end=True))

    def contains(self, t: float | None) -> bool:
        return t is not None and self.start <= t < self.end

    def overlaps(self, start: float, end: float | None) -> bool:
        """Whether ``[start, end)`` (``end`` None: still open) meets the window."""
        return start < self.end and (end is None or end > self.start)

    def to_json(self) -> dict[str, Any]:
        return {"from": utc(self.start), "to": utc(self.end), "start": self.start, "end": self.end}


# -- sections ----------------------------------------------------------------------------


@dataclass
class Section:
    """One section file being gathered; ``cited``: the audit entries its entries name."""

    name: str
    items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    attention: dict[str, list[str]] = field(default_factory=dict)
    gaps: list[str] = field(default_factory=list)
    cited: set[int] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)  # audit.json: the tree head and proofs

    def __post_init__(self) -> None:
        for item in ITEMS:
            if item.startswith(self.name + "."):
                self.items.setdefault(item, [])

    def add(self, item: str, entry: dict[str, Any]) -> None:
        self.items[item].append(entry)
        entry_no = entry.get("entry")
        if isinstance(entry_no, int) and not isinstance(entry_no, bool):
            self.cited.add(entry_no)

    def note(self, item: str, text: str) -> None:
        notes = self.attention.setdefault(item, [])
        if len(notes) < MAX_NOTES:
            notes.append(text)
        elif len(notes) == MAX_NOTES:
            notes.append("1 more note: see the entries")
        else:
            more = int(notes[-1].split()[0]) + 1
            notes[-1] = f"{more} more notes: see the entries"

    def to_json(self, window: Window) -> dict[str, Any]:
        return {
            "format": SECTION_FORMAT,
            "section": self.name,
            "title": SECTIONS[self.name][1],
            "window": window.to_json(),
            "items": self.items,
            "attention": {k: v for k, v in sorted(self.attention.items()) if v},
            "gaps": self.gaps,
            **self.extra,
        }


def event_entry(e: dict[str, Any]) -> dict[str, Any]:
    """An audit event as a section cites it: its entry number and its stored fields."""
    keep = ("entry", "time", "operation", "key", "version", "artifact", "result", "actor", "subject", "source")
    return {k: e[k] for k in keep if k in e}


__all__ = [
    "BUNDLE_FORMAT",
    "DOMAIN",
    "INDEX",
    "ITEMS",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "RECORDS_DIR",
    "RECORD_KINDS",
    "REPORT",
    "SAFE_NAME",
    "SECTIONS",
    "SECTION_FORMAT",
    "SIGNATURE",
    "SIGNATURE_FORMAT",
    "STATE_AT_EXPORT",
    "Section",
    "Window",
    "canonical",
    "event_entry",
    "file_order",
    "fixed_files",
    "parse_time",
    "section_file",
    "utc",
]
