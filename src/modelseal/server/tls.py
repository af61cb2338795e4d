"""The TLS contexts of ``modelseal serve`` and its clients: TLS 1.3 only, mutual, from a
certificate folder ``TLS_DIR`` as ``modelseal cert issue --out`` writes it (``cert.pem`` leaf
then intermediate, ``key.pem``, ``ca.pem`` the root).

Only the standard ``ssl`` module (OpenSSL) verifies here: the client chain, its validity
period and its clientAuth purpose are checked by OpenSSL at the handshake against ``ca.pem``.
No certificate validation of our own. The application then reads the already verified leaf
(``server.identity``).

Reload: ``LiveContext`` builds a whole new server context from the folder (certificate,
key *and* trust anchors) and swaps it in; the listener (``server.hygiene``) hands each new
connection the context current at accept, so open connections keep theirs. The folder is
read through one directory descriptor, so a folder swapped by ``pki.issue.write_dir``
(``renameat2`` exchange) is read as the old three files or the new three, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import CertificateError
from modelseal.pki import tlsctx
from modelseal.pki.identity import Identity
from modelseal.pki.verify import uri_identity

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
# The one key-exchange group (OpenSSL 3.0's default list adds x448 and secp521r1, which
# Mozilla's modern profile rejects; Python 3.11 can set one group only, not a list).
KEX_GROUP = tlsctx.KEX_GROUP  # P-256 only (docs/serve.md)
MAX_PEM = 1 << 20


def _files(tls_dir: Path) -> tuple[Path, Path, Path]:
    ca, cert, key = tls_dir / CA_FILE, tls_dir / CERT_FILE, tls_dir / KEY_FILE
    for p in (ca, cert, key):
        if not p.is_file():
            raise CertificateError(f"{p} is missing: write the folder with 'modelseal cert issue --out {tls_dir}'")
    return ca, cert, key


@contextlib.contextmanager
def _snapshot(tls_dir: Path) -> Iterator[Path]:
    """A path to ``tls_dir`` pinned to the directory it is now (``/proc/self/fd/N``): a
    folder swapped meanwhile is not seen half-way. Falls back to the path itself."""
    try:
        fd = os.open(tls_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield tls_dir  # _files reports what is missing
        return
    try:
        pinned = Path(f"/proc/self/fd/{fd}")
        yield pinned if pinned.is_dir() else tls_dir
    finally:
        os.close(fd)


def _tls13_only(ctx: ssl.SSLContext, required: bool = True) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_ecdh_curve(KEX_GROUP)
    return ctx


def _check_leaf_key(cert: Path, shown: Path) -> x509.Certificate:
    """The leaf of ``cert``; its key must be ECDSA P-256 (the CA issues no other, and the
    server presents no other: docs/serve.md)."""
    try:
        with open(cert, "rb") as f:
            leaf = x509.load_pem_x509_certificates(f.read(MAX_PEM))[0]
    except (ValueError, IndexError, OSError):
        raise CertificateError(f"{shown / CERT_FILE} holds no certificate") from None
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"{shown / CERT_FILE}: the server key must be ECDSA P-256")
    return leaf


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, shown: Path) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError):
        # OpenSSL's text may quote the key file's parse state; say only which folder.
        raise CertificateError(f"cannot load {cert.name}/{key.name} of {shown}: not a matching pair") from None


def _trust(ctx: ssl.SSLContext, ca: Path, shown: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError):
        raise CertificateError(f"{shown / CA_FILE} holds no usable CA certificate") from None


def server_context(tls_dir: Path, client_cert_optional: bool = False) -> ssl.SSLContext:
    """The server side: TLS 1.3 only, a client certificate REQUIRED and verified against
    ``TLS_DIR/ca.pem``, the server's own chain and key (ECDSA P-256) from
    ``cert.pem``/``key.pem``, all three read from one snapshot of the folder.

    Session tickets are off (``num_tickets = 0``): every connection is a full handshake, so
    the client certificate's validity is checked by OpenSSL on each one, never carried
    over by resumption.

    ``client_cert_optional`` (only with the web console, ``modelseal serve --console``): a
    client certificate is asked for and, when one is presented, verified just the same
    (``CERT_OPTIONAL``: a bad one fails the handshake), but a browser without one may
    connect; ``server.identity`` then lets such a request reach ``/ui`` only."""
    with _snapshot(tls_dir) as base:
        ca, cert, key = _files(base)
        _check_leaf_key(cert, tls_dir)
        ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), required=not client_cert_optional)
        ctx.num_tickets = 0
        _trust(ctx, ca, tls_dir)
        _load_chain(ctx, cert, key, tls_dir)
    return ctx


class LiveContext:
    """The server context new connections get: ``current``, replaced whole by ``reload``
    (certificate, key and ``ca.pem``), so a trust anchor removed from ``ca.pem`` is gone for
    every new handshake. A folder that does not load leaves ``current`` as it was."""

    def __init__(self, tls_dir: Path, client_cert_optional: bool = False) -> None:
        self.tls_dir = tls_dir
        self.optional = client_cert_optional
        self.current = server_context(tls_dir, client_cert_optional)

    def reload(self) -> None:
        """Raises ``CertificateError`` (and keeps the old context) if the folder is broken."""
        self.current = server_context(self.tls_dir, self.optional)


def client_context(tls_dir: Path) -> ssl.SSLContext:
    """The client side (``pki.tlsctx.client_context``): TLS 1.3 only, the server verified
    against ``ca.pem`` and by name or IP, ``cert.pem``/``key.pem`` presented, the server's
    one key-exchange group offered."""
    return tlsctx.client_context(tls_dir)


def own_leaf(tls_dir: Path) -> x509.Certificate:
    """The folder's own leaf, parsed only (the folder is the operator's, not a peer's)."""
    _, cert, _ = _files(tls_dir)
    try:
        with open(cert, "rb") as f:
            return x509.load_pem_x509_certificates(f.read(MAX_PEM))[0]
    except (ValueError, IndexError, OSError):
        raise CertificateError(f"{cert} holds no certificate") from None


def own_identity(tls_dir: Path) -> Identity:
    """The identity of the folder's own leaf (its trust domain and environment are the
    server's)."""
    return uri_identity(own_leaf(tls_dir))


__all__ = ["LiveContext", "client_context", "own_identity", "own_leaf", "server_context"]
