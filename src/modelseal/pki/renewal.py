"""The client side of certificate renewal over mutual TLS: a workload renews its own
certificate by presenting the one it still holds.

``due`` says whether two thirds of the leaf's lifetime have passed; ``renew_via`` makes a
fresh P-256 key, sends a CSR for it to ``POST /modelseal/v1/certificates/renew`` over a
TLS 1.3 connection authenticated with the current ``cert.pem``/``key.pem``, checks the
answer (a chain for exactly the new key and the same identity, verifying to the anchors in
``ca.pem``), and swaps the folder whole (``issue.write_dir``): key.pem 0600, ca.pem kept.
The identity is the server's to decide (the caller's verified certificate); the CSR names
what the client expects, and a server that would issue another identity is refused here.

The TLS context is the shared client context of ``pki.tlsctx``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import CertificateError, StorageError
from modelseal.pki.backend import make_csr, sans_of
from modelseal.pki.ca import utcnow
from modelseal.pki.issue import Issued, read_chain, write_dir
from modelseal.pki.tlsctx import client_context
from modelseal.pki.verify import identity_of, uri_identity
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited

ROUTE = "/modelseal/v1/certificates/renew"
CSR_TYPE = "application/pkcs10"
CHAIN_TYPE = "application/pem-certificate-chain"
MAX_CSR = 16 * 1024
MAX_CHAIN_BYTES = 64 * 1024
RENEW_AT = 2 / 3


def due(chain: Sequence[x509.Certificate], now: dt.datetime) -> bool:
    """True once two thirds of the leaf's (``chain[0]``) lifetime have passed."""
    leaf = chain[0]
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    return now >= start + (end - start) * RENEW_AT


def anchors_of(tls_dir: Path) -> list[x509.Certificate]:
    try:
        data = read_limited(tls_dir / "ca.pem", 1 << 20, StorageError, f"{tls_dir / 'ca.pem'}", regular=True)
    except FileNotFoundError:
        raise StorageError(f"{tls_dir} holds no ca.pem") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{tls_dir / 'ca.pem'} holds no certificate") from None


def _post(host: str, port: int, ctx: ssl.SSLContext, body: bytes, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        conn.request("POST", ROUTE, body=body, headers={"Content-Type": CSR_TYPE, "Accept": CHAIN_TYPE})
        resp = conn.getresponse()
        data = resp.read(MAX_CHAIN_BYTES + 1)
        return resp.status, data
    except (OSError, http.client.HTTPException) as e:
        raise CertificateError(f"cannot renew at {host}:{port}: {type(e).__name__}: {str(e)[:160]}") from None
    finally:
        conn.close()


def _reason(body: bytes) -> str:
    """The one-line reason of an OCI-style error body, escaped; else the body's start."""
    text = ""
    try:
        doc = json_loads(body[:4096], max_depth=4, max_values=64, error=ValueError, what="the answer")
        text = str(doc["errors"][0]["message"])
    except (ValueError, KeyError, IndexError, TypeError):
        text = body[:200].decode("utf-8", "replace")
    return " ".join(text.split())[:200].encode("unicode_escape").decode()


Post = Callable[[bytes], tuple[int, bytes]]


def renew_with(post: Post, tls_dir: Path, *, now: dt.datetime | None = None) -> Issued:
    """Renew the certificate in ``tls_dir``, sending the CSR with ``post(body) -> (status,
    answer)`` over a connection authenticated with that certificate (``renew_via``'s own, or
    the registry client's pinned one). Raises ``CertificateError`` (nothing changed) on any
    refusal."""
    t = now or utcnow()
    chain = read_chain(tls_dir)
    leaf = chain[0]
    identity = uri_identity(leaf)
    if not leaf.not_valid_before_utc <= t < leaf.not_valid_after_utc:
        raise CertificateError(f"the certificate in {tls_dir} is not valid now: issue a new one")
    anchors = anchors_of(tls_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, sans_of(leaf)).public_bytes(serialization.Encoding.PEM)
    status, body = post(csr)
    if status != 200:
        raise CertificateError(f"the server refused the renewal ({status}): {_reason(body)}")
    if len(body) > MAX_CHAIN_BYTES:
        raise CertificateError("the server's renewal answer is too large")
    try:
        certs = x509.load_pem_x509_certificates(body)
    except ValueError:
        raise CertificateError("the server's renewal answer is not a PEM certificate chain") from None
    if certs[0].public_key() != key.public_key():
        raise CertificateError("the server returned a certificate for another key")
    got = identity_of(certs, anchors, t, trust_domain=identity.trust_domain)
    if got != identity:
        raise CertificateError(f"the server returned a certificate for {got}, not {identity}")
    issued = Issued(identity, certs[0], certs[1:], anchors[0], key)
    write_dir(issued, tls_dir, force=True, anchors=anchors)
    return issued


def renew_via(host: str, port: int, tls_dir: Path, *, now: dt.datetime | None = None, timeout: float = 30.0) -> Issued:
    """Renew the certificate in ``tls_dir`` at the modelseal server ``host:port`` over a
    connection of its own (see the module docstring; no pins: the registry client's
    ``registry.renewing`` renews over its pinned connections)."""
    ctx = client_context(tls_dir)
    return renew_with(lambda body: _post(host, port, ctx, body, timeout), tls_dir, now=now)


def renew_if_due(
    host: str, port: int, tls_dir: Path, *, now: dt.datetime | None = None, timeout: float = 30.0
) -> Issued | None:
    """``renew_via`` once ``due``; None while the certificate is young."""
    t = now or utcnow()
    if not due(read_chain(tls_dir), t):
        return None
    return renew_via(host, port, tls_dir, now=t, timeout=timeout)


__all__ = [
    "CHAIN_TYPE",
    "CSR_TYPE",
    "MAX_CSR",
    "ROUTE",
    "anchors_of",
    "client_context",
    "due",
    "renew_if_due",
    "renew_via",
    "renew_with",
]
