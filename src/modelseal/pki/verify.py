"""Who a certificate chain names: ``identity_of``, for the server (client certificates) and
the client library.

Chain validation is ``cryptography``'s ``x509.verification`` (RFC 5280 path building,
name constraints, validity, EKU), never our own. After it, the leaf must carry exactly one
URI SAN, a ``spiffe://`` identity of the expected trust domain (the CA carries no URI
name constraints: the verifier does not support them, so this check stands in for them), and its serial must not be
on the denylist.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509 import verification

from modelseal.errors import CertificateError, CertificateRevoked, IdentityError
from modelseal.pki.denylist import Denylist, serial_hex
from modelseal.pki.identity import Identity, parse

MAX_CHAIN = 4


def _cert(obj: bytes | x509.Certificate) -> x509.Certificate:
    if isinstance(obj, x509.Certificate):
        return obj
    try:
        return x509.load_der_x509_certificate(obj)
    except ValueError:
        raise CertificateError("a presented certificate is not a DER certificate") from None


def uri_identity(leaf: x509.Certificate) -> Identity:
    """The one ``spiffe://`` URI SAN of ``leaf`` (any other URI SAN, or none, or two: refused)."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError("the certificate has no subject alternative name") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CertificateError(f"the certificate must name exactly one URI identity, it has {len(uris)}")
    try:
        return parse(uris[0])
    except IdentityError as e:
        raise CertificateError(f"the certificate's identity is refused: {e}") from None


def identity_of(
    cert_chain_der: Sequence[bytes | x509.Certificate],
    trust_anchors: Sequence[x509.Certificate],
    now: dt.datetime,
    denylist: Denylist | None = None,
    *,
    trust_domain: str,
) -> Identity:
    """Validate ``cert_chain_der`` (leaf first, then intermediates) as a TLS client chain
    under ``trust_anchors`` at ``now`` and return the leaf's identity, which must be of
    ``trust_domain``. Raises
    ``CertificateError`` (``CertificateRevoked`` for a denylisted serial)."""
    if not cert_chain_der or len(cert_chain_der) > MAX_CHAIN:
        raise CertificateError(f"a certificate chain of 1 to {MAX_CHAIN} certificates is required")
    if not trust_anchors:
        raise CertificateError("no trust anchors")
    certs = [_cert(c) for c in cert_chain_der]
    leaf, intermediates = certs[0], certs[1:]
    builder = verification.PolicyBuilder().store(verification.Store(list(trust_anchors))).time(now)
    verifier = builder.max_chain_depth(MAX_CHAIN).build_client_verifier()
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as e:
        raise CertificateError(f"the certificate chain does not verify: {str(e)[:200]}") from None
    identity = uri_identity(leaf)
    if identity.trust_domain != trust_domain:
        raise CertificateError(f"the certificate is of trust domain {identity.trust_domain!r}, not {trust_domain!r}")
    if denylist is not None and denylist.revoked(leaf.serial_number):
        raise CertificateRevoked(f"certificate {serial_hex(leaf.serial_number)} ({identity}) is revoked")
    return identity


__all__ = ["identity_of", "uri_identity"]
