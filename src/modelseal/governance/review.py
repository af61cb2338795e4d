"""The access review and its signed attestations.

``build`` lists every binding, grant and break-glass window with its last use (recorded by
the decider through ``GovStore.touch`` whenever a binding contributed to an allowed
request, the same moment the audit log records) and flags what a reviewer must look at:
``expired``, ``unused`` (no use for more than ``UNUSED_DAYS`` days, or never since it was
made that long ago) and ``sod-conflict`` (a key-admin and a reader/publisher binding of one
environment that can meet in one identity, which ``bind`` refuses but older rows or a
changed rule may still hold); given the active holds (``governance.holds``), also ``held``:
the binding's identity, or one its pattern matches, is suspended pending review (its
entry's ``holds`` name each hold and identity). The review is data; its ``digest`` is
SHA-256 over its canonical JSON.

An attestation is the reviewer's ECDSA P-256 signature, made on the client with the private
key of their own certificate folder (``key.pem``), over ``attestation_message(digest,
reviewer)``. The server keeps each review it produced (``gov_reviews``), verifies the
signature with the public key of the connection's verified peer certificate (never one
sent in the body) and keeps it as evidence (``gov_attestations``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import CertificateError, GovernanceError
from modelseal.governance.holds import Hold, held_identities
from modelseal.governance.model import Binding
from modelseal.governance.store import conflicts, dialect_of
from modelseal.pki.verify import uri_identity
from modelseal.util import bounded
from modelseal.util.files import read_limited
from modelseal.util.sqldb import Q, SqlDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gov_reviews (
    digest TEXT PRIMARY KEY, body TEXT NOT NULL, created {REAL} NOT NULL, requested_by TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS gov_reviews_created ON gov_reviews (created);
CREATE TABLE IF NOT EXISTS gov_attestations (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL, reviewer TEXT NOT NULL, signature TEXT NOT NULL,
    certificate TEXT NOT NULL, created {REAL} NOT NULL, UNIQUE (digest, reviewer));
"""
FORMAT = "modelseal-access-review/v1"
ATTESTATION = "modelseal-access-review-attestation/v1"
UNUSED_DAYS = 30
REVIEW_TTL = 7 * 86400.0  # a review can be attested for this long after it was produced
MAX_SIGNATURE = 200  # a DER ECDSA P-256 signature is at most 72 bytes


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _entry(b: Binding, flags: list[str], clash: list[str]) -> dict[str, Any]:
    return {
        "id": b.id,
        "identity": b.pattern,
        "role": b.role,
        "env": b.env,
        "kind": b.kind,
        "expires": b.expires,
        "reason": b.reason,
        "created_by": b.created_by,
        "created": b.created,
        "last_used": b.last_used,
        "flags": flags,
        "conflicts_with": clash,
    }


def build(bindings: Iterable[Binding], now: float | None = None, holds: Iterable[Hold] | None = None) -> dict[str, Any]:
    """The review of ``bindings`` (every one, expired included) at ``now``, with its digest;
    with ``holds``, each entry also lists the identity holds that suspend it (``held``)."""
    t = time.time() if now is None else now
    rows = sorted(bindings, key=lambda b: (b.env, b.pattern, b.role, b.id))
    held = None if holds is None else sorted(held_identities(holds).values(), key=lambda h: (h.subject, h.id))
    entries = []
    for b in rows:
        flags = []
        if not b.active(t):
            flags.append("expired")
        if t - (b.last_used if b.last_used is not None else b.created) > UNUSED_DAYS * 86400:
            flags.append("unused")
        clash = [o.id for o in conflicts(b, rows, t)] if b.active(t) else []
        if clash:
            flags.append("sod-conflict")
        entry = _entry(b, flags, clash)
        if held is not None:
            entry["holds"] = [{"id": h.id, "identity": h.subject} for h in held if b.matches(h.subject)]
            if entry["holds"]:
                flags.append("held")
        entries.append(entry)
    body = {"format": FORMAT, "generated": t, "entries": entries}
    kinds = ("expired", "unused", "sod-conflict") + (("held",) if held is not None else ())
    summary = {f: sum(f in e["flags"] for e in entries) for f in kinds}
    return {**body, "summary": summary, "digest": digest_of(body)}


def digest_of(review: dict[str, Any]) -> str:
    """``sha256:HEX`` over the canonical JSON of a review's format, time and entries."""
    body = {k: review[k] for k in ("format", "generated", "entries")}
    return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()


def attestation_message(digest: str, reviewer: str) -> bytes:
    """What a reviewer signs: the review's digest and their own identity, typed."""
    return _canonical({"type": ATTESTATION, "review": digest, "reviewer": reviewer})


# -- the client side -----------------------------------------------------------------------


def load_reviewer(tls_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """The private key (``key.pem``) and identity (``cert.pem``) of a certificate folder."""
    try:
        key = serialization.load_pem_private_key(
            read_limited(tls_dir / "key.pem", 64 << 10, GovernanceError, "the client key", regular=True), None
        )
        cert = x509.load_pem_x509_certificate(
            read_limited(tls_dir / "cert.pem", 64 << 10, GovernanceError, "the client certificate", regular=True)
        )
        identity = uri_identity(cert).uri
    except FileNotFoundError as e:
        raise GovernanceError(f"the certificate folder {tls_dir} has no {Path(str(e.filename)).name}") from None
    except (ValueError, TypeError, CertificateError):
        raise GovernanceError(f"the certificate folder {tls_dir} holds no usable key and certificate") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise GovernanceError("an attestation is signed with an ECDSA P-256 key")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise GovernanceError(f"key.pem of {tls_dir} is not the key of its cert.pem")
    return key, identity


def sign(key: ec.EllipticCurvePrivateKey, digest: str, reviewer: str) -> str:
    """The attestation signature (DER, base64) of ``reviewer`` over review ``digest``."""
    return base64.b64encode(key.sign(attestation_message(digest, reviewer), ec.ECDSA(hashes.SHA256()))).decode()


# -- the server side -----------------------------------------------------------------------


def verify(peer_der: bytes, digest: str, reviewer: str, signature: str) -> None:
    """Check ``signature`` against the public key of the verified peer certificate."""
    try:
        cert = x509.load_der_x509_certificate(peer_der)
        sig = base64.b64decode(signature, validate=True)
    except (ValueError, TypeError):
        raise GovernanceError("the attestation signature is not base64") from None
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise GovernanceError("an attestation is signed with an ECDSA P-256 key")
    try:
        pub.verify(sig, attestation_message(digest, reviewer), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise GovernanceError("the attestation signature does not verify with the connection's certificate") from None


@dataclass(frozen=True)
class Attestation:
    id: str
    digest: str
    reviewer: str
    signature: str
    certificate: str  # sha256 of the DER certificate that verified it
    created: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Reviews(SqlDatabase):
    """The reviews this server produced and the attestations of them."""

    SCHEMA = _SCHEMA
    ERROR = GovernanceError
    LABEL = "the governance database"
    LOCK = 7369242

    @classmethod
    def open(cls, target: str) -> Reviews:
        """On the same target as ``store.GovStore.open``."""
        return cls(*dialect_of(target))

    def keep(self, review: dict[str, Any], by: str) -> None:
        """Keep ``review`` (``build``'s) so that it can be attested; old unattested ones go."""
        body = _canonical(review).decode()
        digest, t = str(review["digest"]), float(review["generated"])

        def tx(q: Q) -> None:
            q(
                "DELETE FROM gov_reviews WHERE created < ? AND digest NOT IN (SELECT digest FROM gov_attestations)",
                t - REVIEW_TTL,
            )
            if q("SELECT 1 FROM gov_reviews WHERE digest = ?", digest).fetchone() is None:
                q(
                    "INSERT INTO gov_reviews (digest, body, created, requested_by) VALUES (?, ?, ?, ?)",
                    digest,
                    body,
                    t,
                    by,
                )

        self.run(tx)

    def review(self, digest: str) -> dict[str, Any] | None:
        row = self.run(lambda q: q("SELECT body FROM gov_reviews WHERE digest = ?", digest).fetchone(), write=False)
        if row is None:
            return None
        doc = bounded.json_loads(
            str(row[0]).encode(), max_depth=8, max_values=2_000_000, error=GovernanceError, what="a kept review"
        )
        return dict(doc)

    def attest(
        self, digest: str, reviewer: str, signature: str, peer_der: bytes, now: float | None = None
    ) -> Attestation:
        """Verify and keep ``reviewer``'s attestation of review ``digest`` (see ``verify``)."""
        t = time.time() if now is None else now
        if not isinstance(signature, str) or len(signature) > MAX_SIGNATURE:
            raise GovernanceError("the attestation signature is not a DER ECDSA signature in base64")
        kept = self.review(digest) if isinstance(digest, str) and len(digest) == 71 else None
        if kept is None or digest_of(kept) != digest:
            raise GovernanceError("no review with that digest was produced by this server (modelseal access review)")
        if t - float(kept["generated"]) > REVIEW_TTL:
            raise GovernanceError("that review is older than 7 days: attest a fresh one")
        verify(peer_der, digest, reviewer, signature)
        a = Attestation(secrets.token_hex(8), digest, reviewer, signature, hashlib.sha256(peer_der).hexdigest(), t)

        def tx(q: Q) -> None:
            if q("SELECT 1 FROM gov_attestations WHERE digest = ? AND reviewer = ?", digest, reviewer).fetchone():
                raise GovernanceError(f"{reviewer} already attested review {digest}")
            q(
                "INSERT INTO gov_attestations (id, digest, reviewer, signature, certificate, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                a.id,
                a.digest,
                a.reviewer,
                a.signature,
                a.certificate,
                a.created,
            )

        self.run(tx)
        return a

    def attestations(self, digest: str | None = None) -> list[Attestation]:
        sql = "SELECT id, digest, reviewer, signature, certificate, created FROM gov_attestations"

        def tx(q: Q) -> list[Attestation]:
            rows = q(sql + " WHERE digest = ? ORDER BY created", digest) if digest else q(sql + " ORDER BY created")
            return [Attestation(r[0], r[1], r[2], r[3], r[4], float(r[5])) for r in rows.fetchall()]

        return self.run(tx, write=False)


__all__ = [
    "ATTESTATION",
    "FORMAT",
    "UNUSED_DAYS",
    "Attestation",
    "Reviews",
    "attestation_message",
    "build",
    "digest_of",
    "load_reviewer",
    "sign",
    "verify",
]
