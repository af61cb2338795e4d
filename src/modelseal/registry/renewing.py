"""The registry client renews its own certificate, over its own pinned connection.

Before a push or pull, ``renew_if_due`` checks the client certificate in the transport's
TLS folder: once two thirds of its lifetime have passed (``pki.renewal.due``), it sends a
CSR for a fresh key to ``POST /modelseal/v1/certificates/renew`` through the transport,
so the request goes out only after the pin check (``registry.tlsclient``), authenticated
by the certificate it still holds. ``pki.renewal.renew_with`` checks the answer (the new
key, the same identity, a chain to the anchors in ``ca.pem``) and swaps the folder whole;
the transport presents the new certificate on its next connection.

A registry that does not offer renewal (another OCI registry, or ``modelseal serve``
without ``--issue-certificates``) answers 404: the certificate still works until it
expires, so the transfer goes on and a warning says so. Any other refusal is the same
warning; the transfer is refused only by the handshake once the certificate has expired.
"""

from __future__ import annotations

import datetime as dt
import logging

from modelseal.errors import CertificateError, RegistryError
from modelseal.pki.ca import utcnow
from modelseal.pki.issue import Issued, read_chain
from modelseal.pki.renewal import CHAIN_TYPE, CSR_TYPE, MAX_CHAIN_BYTES, ROUTE, due, renew_with
from modelseal.registry.transport import Transport

_log = logging.getLogger("modelseal.registry")


def renew_if_due(transport: Transport, *, now: dt.datetime | None = None) -> Issued | None:
    """Renew the transport's client certificate if it is due; None if it is not, or if the
    registry could not renew it (logged as a warning; the certificate is unchanged)."""
    t = now or utcnow()
    if not due(read_chain(transport.tls_dir), t):
        return None

    def post(body: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": CSR_TYPE, "Accept": CHAIN_TYPE}
        reply = transport.request("POST", ROUTE, headers=headers, body=body, retry=False, limit=MAX_CHAIN_BYTES)
        return reply.status, reply.body

    try:
        return renew_with(post, transport.tls_dir, now=t)
    except (CertificateError, RegistryError) as e:
        _log.warning("the client certificate is due for renewal and was not renewed: %s", e)
        return None


__all__ = ["renew_if_due"]
