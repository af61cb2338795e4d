"""The TLS contexts of ``modelseal serve`` and its clients: TLS 1.3 only, mutual, from a
certificate folder ``TLS_DIR`` as ``modelseal cert issue --out`` writes it (``cert.pem`` leaf
then intermediate, ``key.pem``, ``ca.pem`` the root).

Only the standard ``ssl`` module (OpenSSL) verifies here: the client chain, its validity
period and its clientAuth purpose are checked by OpenSSL at the handshake against ``ca.pem``.
No certificate validation of our own. The application then reads the already verified leaf
(``server.identity``). ``reload`` swaps the server certificate on the live context: new
handshakes get the new one, open connections keep theirs.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from modelseal.errors import CertificateError
from modelseal.pki.identity import Identity
from modelseal.pki.verify import uri_identity

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


def _files(tls_dir: Path) -> tuple[Path, Path, Path]:
    ca, cert, key = tls_dir / CA_FILE, tls_dir / CERT_FILE, tls_dir / KEY_FILE
    for p in (ca, cert, key):
        if not p.is_file():
            raise CertificateError(f"{p} is missing: write the folder with 'modelseal cert issue --out {tls_dir}'")
    return ca, cert, key


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError):
        # OpenSSL's text may quote the key file's parse state; say only which folder.
        raise CertificateError(f"cannot load {cert.name}/{key.name} of {cert.parent}: not a matching pair") from None


def server_context(tls_dir: Path) -> ssl.SSLContext:
    """The server side: TLS 1.3 only, a client certificate REQUIRED and verified against
    ``TLS_DIR/ca.pem``, the server's own chain and key from ``cert.pem``/``key.pem``.

    Session tickets are off (``num_tickets = 0``): every connection is a full handshake, so
    the client certificate's validity is checked by OpenSSL on each one, never carried
    over by resumption."""
    ca, cert, key = _files(tls_dir)
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.num_tickets = 0
    _trust(ctx, ca)
    _load_chain(ctx, cert, key)
    return ctx


def _trust(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError):
        raise CertificateError(f"{ca} holds no usable CA certificate") from None


def reload(ctx: ssl.SSLContext, tls_dir: Path) -> None:
    """Load ``TLS_DIR``'s certificate and key into the live ``ctx``: handshakes from now on
    present them, open connections are unaffected. The pair is first loaded into a scratch
    context, so a broken folder leaves ``ctx`` serving the old certificate."""
    _, cert, key = _files(tls_dir)
    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
    _load_chain(ctx, cert, key)


def client_context(tls_dir: Path) -> ssl.SSLContext:
    """The client side: TLS 1.3 only, verifies the server's chain against ``ca.pem`` and its
    host name or IP address against the certificate, presents ``cert.pem``/``key.pem``."""
    ca, cert, key = _files(tls_dir)
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = True
    _trust(ctx, ca)
    _load_chain(ctx, cert, key)
    return ctx


def own_identity(tls_dir: Path) -> Identity:
    """The identity of the folder's own leaf (its trust domain and environment are the
    server's). Parsed only; the folder is the operator's, not a peer's."""
    _, cert, _ = _files(tls_dir)
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (ValueError, IndexError):
        raise CertificateError(f"{cert} holds no certificate") from None
    return uri_identity(leaf)


__all__ = ["client_context", "own_identity", "reload", "server_context"]
