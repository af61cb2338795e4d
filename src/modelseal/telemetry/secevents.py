"""The security event: one record of the monitoring timeline (docs/monitoring.md, "Events").

The detectors (``telemetry.detectors``), the correlation rules and the SIEM export
(``telemetry.export``) all read this one shape, whatever the record came from: an audit
log entry (``from_audit``: the broker's and the registry's key operations and decisions)
or a TLS connection event of the server (``from_tls``: a failed handshake, or a request
refused for its certificate). Every field is data: an identity, an address or a resource
name is compared and counted, never used as a path, URL or setting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

SCHEMA_VERSION = 1
KINDS = ("audit", "tls")
OUTCOMES = ("success", "failure", "denied")
MAX_FIELD = 512  # a longer string from a row is cut: the record stays bounded


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_FIELD]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float:
    try:
        return float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else 0.0
    except (ValueError, OverflowError):
        return 0.0


@dataclass(frozen=True)
class SecurityEvent:
    """One event. ``operation``: the audit operation (``authorize``, ``unwrap``, ``rotate``,
    ...) or ``handshake``; ``action`` and ``resource``: the Cedar action and resource of a
    decision (``key.unwrap``, ``Key:prod-llm``), None otherwise; ``result``: as recorded
    (``ok``, ``allow:role-reader``, ``deny:gov-sod``, an error class, a TLS failure reason);
    ``outcome``: ``success``, ``failure`` (an operation or handshake that failed) or
    ``denied`` (a decision that refused); ``entry``: the audit log entry, None for a TLS
    event."""

    time: float
    kind: str
    operation: str
    result: str
    outcome: str
    actor: str | None = None
    source: str | None = None
    action: str | None = None
    resource: str | None = None
    key: str | None = None
    version: int | None = None
    artifact: str | None = None
    entry: int | None = None
    subject: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The export shape: ``schema`` first, every field, None as null."""
        return {"schema": f"modelseal.security-event/v{SCHEMA_VERSION}", **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def outcome_of(operation: str, result: str) -> str:
    if operation == "authorize":
        return "success" if result.startswith("allow") else "denied"
    if result in ("ok", "") or result.startswith(("ok:", "allow", "alert", "queued:")):
        return "success"
    return "denied" if result.startswith("deny") else "failure"


def from_audit(doc: Mapping[str, Any]) -> SecurityEvent:
    """The event of one audit log entry (a parsed row: ``MerkleAuditLog.events``), whose
    fields may be anything a writer of the database put there: each is type-checked and cut."""
    operation = _text(doc.get("operation")) or "?"
    result = _text(doc.get("result")) or ""
    key = _text(doc.get("key"))
    action = resource = None
    if operation in ("authorize", "exception-expired", "break-glass-use") and key and " " in key:
        action, _, resource = key.partition(" ")
    return SecurityEvent(
        time=_float(doc.get("time")),
        kind="audit",
        operation=operation,
        result=result,
        outcome=outcome_of(operation, result),
        actor=_text(doc.get("actor")),
        source=_text(doc.get("source")),
        action=action,
        resource=resource,
        key=key,
        version=_int(doc.get("version")),
        artifact=_text(doc.get("artifact")),
        entry=_int(doc.get("entry")),
        subject=_text(doc.get("subject")),
    )


def from_tls(time: float, source: str, reason: str, actor: str | None = None) -> SecurityEvent:
    """A failed handshake, or a request refused for its certificate, from ``source``
    (``reason``: ``server.handshakes.REASONS``); ``actor``: the certificate's identity
    where one was presented and parsed."""
    return SecurityEvent(
        time=time,
        kind="tls",
        operation="handshake",
        result=_text(reason) or "other",
        outcome="failure",
        actor=_text(actor),
        source=_text(source),
    )


__all__ = ["KINDS", "OUTCOMES", "SCHEMA_VERSION", "SecurityEvent", "from_audit", "from_tls", "outcome_of"]
