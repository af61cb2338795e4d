"""The client side of the registry's TLS: the TLS 1.3 client context from a certificate folder,
and the pin check of the server's issuing CA (docs/push-pull.md, "Pinning").

OpenSSL verifies the server's chain against ``TLS_DIR/ca.pem`` and its name or IP at the
handshake; nothing here validates certificates. ``pin_check`` then asks which CA key issued
the server's leaf:

- OpenSSL's own verified chain (``SSLSocket.get_verified_chain``: public from Python 3.13,
  the same call is ``SSLObject.get_verified_chain`` on 3.10 to 3.12); ``pki.pins.check_pins``
  must find a pinned key among its CA certificates. After a roll-over the server sends the
  new intermediate, whose key is the old backup pin: accepted with nothing to do client-side.
- Where neither exists, the issuer is found among the CA certificates this client holds
  (the intermediates of ``TLS_DIR/cert.pem``, and of an optional ``issuers`` PEM file kept
  outside ``TLS_DIR``, which ``cert renew`` keeps to its three files): the one
  ``cryptography`` verifies as having signed the leaf. A signature valid under a pinned key
  means the holder of that key issued the leaf, whatever file the certificate came from.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from modelseal.errors import CertificateError
from modelseal.pki.pins import PinMismatch, check_pins
from modelseal.pki.tlsctx import client_context


def _pem_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        raise CertificateError(f"{path} holds no readable certificate") from None


def held_issuers(tls_dir: Path, issuers: Path | None = None) -> list[x509.Certificate]:
    """The CA certificates this client holds: ``cert.pem``'s intermediates, ``issuers``, ``ca.pem``."""
    extra = _pem_certs(issuers) if issuers is not None else []
    certs = _pem_certs(tls_dir / "cert.pem")[1:] + extra + _pem_certs(tls_dir / "ca.pem")
    return [c for c in certs if _is_ca(c)]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verified_chain(sock: ssl.SSLSocket) -> list[x509.Certificate] | None:
    """OpenSSL's verified chain of the peer, leaf first (None where Python does not expose it)."""
    public = getattr(sock, "get_verified_chain", None)
    if public is not None:  # Python 3.13+: DER bytes
        return [x509.load_der_x509_certificate(bytes(c)) for c in public()]
    private = getattr(getattr(sock, "_sslobj", None), "get_verified_chain", None)
    if private is None:
        return None
    return [x509.load_der_x509_certificate(c.public_bytes(ssl._ssl.ENCODING_DER)) for c in private()]  # type: ignore[attr-defined]


def issuer_chain(leaf: x509.Certificate, held: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """``[leaf, issuer, its issuer...]`` from the certificates ``held``, each link checked by
    ``cryptography``'s signature verification; just ``[leaf]`` if none signed the leaf."""
    chain = [leaf]
    while len(chain) < 4:
        nxt = next((c for c in held if c not in chain and _issued_by(chain[-1], c)), None)
        if nxt is None:
            break
        chain.append(nxt)
    return chain


def pin_check(
    sock: ssl.SSLSocket, pins: Sequence[str], held: Sequence[x509.Certificate], *, use_openssl_chain: bool = True
) -> str:
    """The pin the server's issuing CA matched; ``PinMismatch`` if none (see the module doc)."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise PinMismatch("the server presented no certificate")
    leaf = x509.load_der_x509_certificate(der)
    chain = verified_chain(sock) if use_openssl_chain else None
    if chain is not None:
        if len(chain) < 2 or chain[0] != leaf or not _issued_by(leaf, chain[1]):
            raise PinMismatch("the server's verified chain does not start with its certificate")
    else:
        chain = issuer_chain(leaf, held)
        if len(chain) < 2:
            raise PinMismatch(
                "the server's certificate was issued by no CA certificate this client holds (renew this client's"
                " certificate, or give the new intermediate as issuers): refusing the connection"
            )
    return check_pins(pins, chain)


__all__ = ["client_context", "held_issuers", "issuer_chain", "pin_check", "verified_chain"]
