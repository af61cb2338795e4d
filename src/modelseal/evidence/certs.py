"""Certificates as evidence (docs/evidence.md, "Certificates"; the CA's files: docs/pki.md).

The CA (``$MODELSEAL_HOME/ca/``): its trust domain, backend and KEK, and the root and
issuing certificates it holds (subject, serial, validity, SHA-256 fingerprint), local CA or
OpenBao's PKI engine (``transit-pki``); no private key is read. Certificates issued in the
window (``issued.json``, which forgets a certificate a day after it expires, so the audit
log's ``cert-issue``/``cert-renew`` events are listed too), and those revoked in the window
(``revoked.json``, the denylist every server enforces).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from modelseal.errors import ModelsealError
from modelseal.evidence.model import Section, Window, event_entry, utc
from modelseal.pki import denylist, store

CA_OPS = frozenset({"ca-init", "cert-issue", "cert-renew", "cert-revoke", "ca-rotate-intermediate"})
_CERT_FILE = re.compile(r"(root|issuing)-(\d{1,9})\.pem")
_TRANSIT_FIELDS = ("backend", "trust_domain", "mount", "role", "server_role", "root_mount", "backup_pin")


def _cert_row(cert: x509.Certificate, role: str, live: bool) -> dict[str, Any]:
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "role": role,
        "live": live,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": denylist.serial_hex(cert.serial_number),
        "not_before": utc(cert.not_valid_before_utc.timestamp()),
        "not_after": utc(cert.not_valid_after_utc.timestamp()),
        "sha256": hashlib.sha256(der).hexdigest(),
    }


def _authority(folder: Path, s: Section) -> None:
    doc = store.read_json(folder, "ca.json")
    if not isinstance(doc, dict):
        s.gaps.append("no CA on this host")
        return
    fmt = str(doc.get("format", ""))
    if fmt.endswith("transit-pki-v1"):
        meta = {k: doc.get(k) for k in _TRANSIT_FIELDS if k in doc}
        for role in ("root", "issuing"):
            pem = doc.get(role)
            if isinstance(pem, str):
                s.add(
                    "certificates.authority",
                    {**meta, **_cert_row(x509.load_pem_x509_certificate(pem.encode()), role, True)},
                )
        return
    meta = {"backend": "local", "trust_domain": doc.get("trust_domain"), "kek": doc.get("kek")}
    live = {"root": doc.get("root_generation"), "issuing": doc.get("generation")}
    for path in sorted(folder.iterdir()):
        m = _CERT_FILE.fullmatch(path.name)
        if m is None:
            continue
        data = store.read(folder, path.name)
        if data is None:
            continue
        cert = x509.load_pem_x509_certificate(data)
        role, gen = m.group(1), int(m.group(2))
        s.add("certificates.authority", {**meta, "generation": gen, **_cert_row(cert, role, live[role] == gen)})


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def gather(folder: Path, window: Window, events: list[dict[str, Any]], now: float) -> Section:
    """The ``certificates`` section."""
    s = Section("certificates")
    if folder.is_dir():
        try:
            _authority(folder, s)
            rows = store.read_json(folder, "issued.json") or {"issued": []}
            issued = rows.get("issued", []) if isinstance(rows, dict) else []
            for r in sorted(
                (r for r in issued if isinstance(r, dict)),
                key=lambda r: (_number(r.get("issued_at")) or 0, str(r.get("serial"))),
            ):
                t = _number(r.get("issued_at"))
                if window.contains(t):
                    na = _number(r.get("not_after"))
                    s.add(
                        "certificates.issued",
                        {
                            "serial": str(r.get("serial", "")),
                            "identity": str(r.get("identity", "")),
                            "issued_at": utc(t),
                            "not_after": utc(na),
                            "renewed_from": r.get(denylist.PARENT),
                            "expired": bool(na is not None and na <= now),
                        },
                    )
            listed = denylist.load(folder)
            for rv in sorted(listed.entries.values(), key=lambda x: (x.revoked_at, x.serial)):
                if window.contains(rv.revoked_at):
                    s.add(
                        "certificates.revoked",
                        {
                            "serial": denylist.serial_hex(rv.serial),
                            "revoked_at": utc(rv.revoked_at),
                            "reason": rv.reason,
                            "not_after": utc(rv.not_after),
                        },
                    )
        except (ModelsealError, ValueError, OSError) as e:
            s.gaps.append(f"the CA files could not be read: {str(e)[:300]}")
    else:
        s.gaps.append("no CA on this host")
    for ev in events:
        if ev.get("operation") in CA_OPS:
            s.add("certificates.events", event_entry(ev))
            if ev.get("result") != "ok":
                s.note("certificates.events", f"entry {ev['entry']}: {ev.get('operation')} -> {ev.get('result')}")
    return s


__all__ = ["CA_OPS", "gather"]
