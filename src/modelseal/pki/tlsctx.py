"""The one TLS client context of modelseal: a certificate folder (``cert.pem``, ``key.pem``,
``ca.pem``, as ``modelseal cert issue --out`` writes it) presented over TLS 1.3.

The server is verified by OpenSSL against ``ca.pem`` (``VERIFY_X509_STRICT``) and by host
name or IP address; the folder's certificate is presented. The key exchange offers the
server's one group, P-256 (``server.tls``), so no handshake needs a HelloRetryRequest.
Used by the registry client (``registry.tlsclient``, which adds the pin check), the
client's renewal (``pki.renewal``) and the server's tests (``server.tls.client_context``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from modelseal.errors import CertificateError

KEX_GROUP = "prime256v1"  # P-256: the one group modelseal serve offers (docs/serve.md)


def client_context(tls_dir: Path) -> ssl.SSLContext:
    """TLS 1.3 only; verifies the server against ``ca.pem`` and its host name or IP; presents
    ``cert.pem``/``key.pem``. Raises ``CertificateError`` naming the folder, never OpenSSL's text."""
    ca, cert, key = (tls_dir / n for n in ("ca.pem", "cert.pem", "key.pem"))
    for p in (ca, cert, key):
        if not p.is_file():
            raise CertificateError(f"{p} is missing: write the folder with 'modelseal cert issue --out {tls_dir}'")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.check_hostname = True
    ctx.set_ecdh_curve(KEX_GROUP)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError):
        raise CertificateError(f"{ca} holds no usable CA certificate") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError):
        # OpenSSL's text may quote the key file's parse state; say only which folder.
        raise CertificateError(f"cannot load cert.pem/key.pem of {tls_dir}: not a matching pair") from None
    return ctx


__all__ = ["KEX_GROUP", "client_context"]
