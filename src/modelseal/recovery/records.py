"""The signed records of restore drills and real restores (docs/recovery.md, "Restore drills").

A record is one JSON document under ``$MODELSEAL_HOME/evidence/drills/`` (a drill) or
``.../evidence/restores/`` (a restore), written once (``util.files.write_atomic``,
exclusive, 0600), followed by its audit event: operation ``backup-drill`` or
``backup-restore``, result ``ok`` or the error class name, key ``evidence:<path relative
to the home>``, artifact the SHA-256 hex of the file's bytes. The tamper-evident audit log
so vouches for the file (the pattern of ``telemetry.controlsrecord``; the monitoring pass
turns ``backup-drill`` ok events into the last-drill metric, and ``modelseal evidence
export`` collects both).

The file is also signed by the host's audit key (Ed25519, ``audit-signing.key``: the key of
the audit log the event goes to), over
``DOMAIN[kind] || canonical(body)``, with a prefix per document type so a drill record's
signature can never pass as a backup manifest's or an audit entry's. The file holds
``{"body": ..., "signer": <public key hex>, "signature": <hex>}``, canonical JSON. A verifier
trusts a key it got out of band (``trusted``), never the ``signer`` the file names alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.audit.log import MerkleAuditLog, load_or_create_signing_key, public_key_hex
from modelseal.errors import EvidenceTampered
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited, write_atomic

DRILL, RESTORE = "drill", "restore"
FORMATS = {DRILL: "modelseal-backup-drill/v1", RESTORE: "modelseal-backup-restore/v1"}
DOMAIN = {DRILL: b"modelseal-backup-drill-record/v1\n", RESTORE: b"modelseal-backup-restore-record/v1\n"}
FOLDERS = {DRILL: ("evidence", "drills"), RESTORE: ("evidence", "restores")}
OPERATIONS = {DRILL: "backup-drill", RESTORE: "backup-restore"}
SIGNING_KEY = "audit-signing.key"
MAX_RECORD = 4 << 20


def canonical(doc: Any) -> bytes:
    """Sorted keys, no whitespace, no NaN: one byte string per document."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode()


def signed_message(kind: str, body: dict[str, Any]) -> bytes:
    return DOMAIN[kind] + canonical(body)


def seal_record(kind: str, body: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The file's bytes: ``body`` (with its ``format``), the signer and the signature."""
    body = {**body, "format": FORMATS[kind]}
    sig = key.sign(signed_message(kind, body))
    doc = {"body": body, "signer": public_key_hex(key.public_key()), "signature": sig.hex()}
    return canonical(doc) + b"\n"


def write_record(
    kind: str, body: dict[str, Any], home: Path, sink: AuditSink, *, result: str, started: float
) -> tuple[Path, str]:
    """Write the signed record into ``home`` and its audit event to ``sink``; (path, sha256 hex).
    ``result``: ``ok`` or the error class name of the failure the record describes."""
    folder = home.joinpath(*FOLDERS[kind])
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{kind}-{stamp}-{secrets.token_hex(4)}.json"
    # The key of the audit log the event goes to (beside a SQLite log elsewhere than the home),
    # so the record verifies under the keys that log's verifiers already trust.
    key = sink.signing_key if isinstance(sink, MerkleAuditLog) else load_or_create_signing_key(home / SIGNING_KEY)
    data = seal_record(kind, body, key)
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(path, data, mode=0o600, exclusive=True)
    where = "evidence:" + "/".join((*FOLDERS[kind], path.name))
    sink.emit(AuditEvent(OPERATIONS[kind], where, result, artifact=digest))
    return path, digest


def _bad(why: str) -> EvidenceTampered:
    return EvidenceTampered(f"not a valid backup record: {why}")


def read_record(path: Path, kind: str, trusted: Iterable[Ed25519PublicKey]) -> dict[str, Any]:
    """The body of the record at ``path``, if it is well-formed and signed, under ``kind``'s
    domain, by one of the ``trusted`` keys; ``EvidenceTampered`` otherwise."""
    data = read_limited(path, MAX_RECORD, EvidenceTampered, str(path), regular=True)
    doc = json_loads(data, max_depth=16, max_values=1_000_000, error=_bad)
    if not isinstance(doc, dict) or set(doc) != {"body", "signer", "signature"}:
        raise _bad("not a signed record")
    body, signer, sig = doc["body"], doc["signer"], doc["signature"]
    if not isinstance(body, dict) or body.get("format") != FORMATS[kind]:
        raise _bad(f"not a {kind} record")
    if not isinstance(signer, str) or not isinstance(sig, str) or canonical(doc) + b"\n" != data:
        raise _bad("not in canonical form")
    try:
        raw_sig = bytes.fromhex(sig)
    except ValueError:
        raise _bad("a malformed signature") from None
    for key in trusted:
        if not hmac.compare_digest(public_key_hex(key), signer):
            continue
        try:
            key.verify(raw_sig, signed_message(kind, body))
        except InvalidSignature:
            raise EvidenceTampered(f"{path.name}: the record's signature does not verify") from None
        return body
    raise EvidenceTampered(f"{path.name}: the record is not signed by a trusted audit key")


def host_key(home: Path) -> Ed25519PublicKey:
    """This host's audit key (the one records are signed with), made on first use."""
    return load_or_create_signing_key(home / SIGNING_KEY).public_key()


__all__ = [
    "DOMAIN",
    "DRILL",
    "FOLDERS",
    "FORMATS",
    "OPERATIONS",
    "RESTORE",
    "canonical",
    "host_key",
    "read_record",
    "seal_record",
    "write_record",
]
