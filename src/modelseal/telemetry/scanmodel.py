"""The records of ``modelseal scan`` (docs/scan.md): a ``Finding``, and the ``ScanReport``
that collects findings, artifact states, notes and errors, and prints itself as lines or
one JSON document.

The finding kinds and the artifact states are a fixed, bounded vocabulary: they are the
label values of ``modelseal_scan_findings{kind}`` and ``modelseal_artifacts{state}``
(``scanoutput``), and the alert rules match them. Every location and detail is data read
from the scanned storage or a server: it is escaped when printed (``escape``), never
interpreted.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from modelseal.keys.service import printable

PLAINTEXT_MODEL = "plaintext-model"
UNSIGNED = "unsigned"
UNTRUSTED_SIGNATURE = "untrusted-signature"
REVOKED = "revoked"
DISABLED_KEY_VERSION = "disabled-key-version"
PAST_CRYPTOPERIOD = "past-cryptoperiod"
DAMAGED_SLOT = "damaged-slot"
UNENCRYPTED_BACKUP = "unencrypted-backup"  # a backup in clear (scanbackup)
BUCKET_NO_DEFAULT_ENCRYPTION = "bucket-no-default-encryption"
BUCKET_PUBLIC_ACCESS = "bucket-public-access"
TLS_WEAK_PROTOCOL = "tls-weak-protocol"
TLS_WEAK_CIPHER = "tls-weak-cipher"
TLS_CERTIFICATE_LIFETIME = "tls-certificate-lifetime"
TLS_PIN_MISMATCH = "tls-pin-mismatch"
KINDS = (
    PLAINTEXT_MODEL,
    UNSIGNED,
    UNTRUSTED_SIGNATURE,
    REVOKED,
    DISABLED_KEY_VERSION,
    PAST_CRYPTOPERIOD,
    DAMAGED_SLOT,
    UNENCRYPTED_BACKUP,
    BUCKET_NO_DEFAULT_ENCRYPTION,
    BUCKET_PUBLIC_ACCESS,
    TLS_WEAK_PROTOCOL,
    TLS_WEAK_CIPHER,
    TLS_CERTIFICATE_LIFETIME,
    TLS_PIN_MISMATCH,
)

SEALED_SIGNED = "sealed-signed"
SEALED_UNSIGNED = "sealed-unsigned"
STATE_REVOKED = "revoked"
STATE_PAST_CRYPTOPERIOD = "past-cryptoperiod"
PLAINTEXT = "plaintext"
STATES = (SEALED_SIGNED, SEALED_UNSIGNED, STATE_REVOKED, STATE_PAST_CRYPTOPERIOD, PLAINTEXT)

WARNING, CRITICAL = "warning", "critical"


def escape(value: object) -> str:
    """``value`` as one printable line, escaped exactly as ``cli.common.escape`` escapes
    (``keys.service.printable``: a backslash and every non-printable character)."""
    return printable(value if isinstance(value, str) else str(value))


def location(value: str) -> str:
    """A location escaped for a line: as ``escape``, and a space as ``\\x20``, so the two
    spaces after it always end it, whatever the name holds (the detail is the line's rest)."""
    return escape(value).replace(" ", "\\x20")


MAX_PER_KIND = 10_000  # findings of one kind kept in memory; the counts go on
MAX_ERRORS = 10_000


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    location: str  # a path, s3://bucket/key, oci://host/repo:tag#layer, tls://host:port
    detail: str  # one line, for a person
    severity: str = WARNING

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.severity not in (WARNING, CRITICAL):
            raise ValueError(f"unknown finding kind {self.kind!r}")

    def line(self) -> str:
        return f"{self.kind}  {location(self.location)}  {escape(self.detail)}"

    def to_json(self) -> dict[str, str]:
        return {"detail": self.detail, "kind": self.kind, "location": self.location, "severity": self.severity}


@dataclass
class ScanReport:
    """Findings (at most ``MAX_PER_KIND`` of each kind listed, every one counted), artifact
    states, notes, errors (what could not be read: the scan is incomplete), and the targets
    that failed as a whole (``failed``: their typed errors, the first decides the exit code)."""

    target: str
    started: float = field(default_factory=time.time)
    findings: list[Finding] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)  # artifacts by protection state
    formats: Counter[str] = field(default_factory=Counter)  # files by what they are
    notes: list[str] = field(default_factory=list)  # what could not be decided, and why
    errors: list[str] = field(default_factory=list)  # what could not be read (LOCATION: why)
    files: int = 0
    elapsed: float = 0.0
    failed: list[Exception] = field(default_factory=list)  # targets that failed as a whole
    error_count: int = 0  # every error, listed or not
    _counts: Counter[str] = field(default_factory=Counter, repr=False)
    _noted: set[str] = field(default_factory=set, repr=False)
    _error_lines: list[str] = field(default_factory=list, repr=False)

    def add(self, finding: Finding) -> None:
        self._counts[finding.kind] += 1
        if self._counts[finding.kind] <= MAX_PER_KIND:
            self.findings.append(finding)

    def note(self, text: str) -> None:
        """Record once what the scan could not decide (an unknown is a note, never a finding)."""
        if text not in self._noted and len(self._noted) < 1000:
            self._noted.add(text)
            self.notes.append(text)

    def error(self, where: str, why: str) -> None:
        """Something that could not be read or decided: the scan is incomplete."""
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"{where}: {why}")
            self._error_lines.append(f"error  {location(where)}  {escape(why)}")

    @property
    def finding_count(self) -> int:
        return sum(self._counts.values())

    @property
    def incomplete(self) -> bool:
        return self.error_count > 0

    def by_kind(self) -> dict[str, int]:
        return {k: self._counts.get(k, 0) for k in KINDS}

    def omitted(self) -> dict[str, int]:
        return {k: n - MAX_PER_KIND for k, n in sorted(self._counts.items()) if n > MAX_PER_KIND}

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.by_kind().items() if n) or "none"
        states = ", ".join(f"{s} {self.states[s]}" for s in STATES if self.states.get(s)) or "none"
        return (
            f"scanned {self.files} files in {self.elapsed:.2f}s: {self.finding_count} findings ({kinds});"
            f" artifacts: {states}; {self.error_count} unreadable, {len(self.notes)} notes"
            + ("; INCOMPLETE" if self.incomplete else "")
        )

    def lines(self) -> list[str]:
        out = [f.line() for f in self.findings]
        out += [f"note  {n} more {k} findings, not listed (counted)" for k, n in self.omitted().items()]
        out += [f"note  {escape(n)}" for n in self.notes]
        out += self._error_lines
        if self.error_count > len(self._error_lines):
            out.append(f"note  {self.error_count - len(self._error_lines)} more errors, not listed (counted)")
        return [*out, self.summary()]

    def to_json(self) -> dict[str, Any]:
        return {
            "artifacts": {s: self.states.get(s, 0) for s in STATES},
            "elapsed_seconds": round(self.elapsed, 3),
            "errors": list(self.errors),
            "errors_total": self.error_count,
            "files": self.files,
            "findings": [f.to_json() for f in self.findings],
            "findings_by_kind": self.by_kind(),
            "findings_not_listed": self.omitted(),
            "formats": dict(sorted(self.formats.items())),
            "incomplete": self.incomplete,
            "notes": list(self.notes),
            "started": self.started,
            "target": self.target,
        }


__all__ = ["KINDS", "MAX_PER_KIND", "STATES", "Finding", "ScanReport", "escape", "location"]
