"""Who is calling: the aiohttp middleware that turns the verified client certificate into
an ``Identity`` on the request, or refuses the request.

The chain was verified by OpenSSL at the handshake against ``ca.pem`` (``server.tls``:
TLS 1.3 only, ``CERT_REQUIRED``, no session resumption), so a connection without a valid
client certificate never reaches a handler. Python's ``ssl`` has no verify callback, so
what OpenSSL cannot know is checked here, per request, on the leaf OpenSSL accepted: its
one ``spiffe://`` URI SAN (``pki.verify.uri_identity``), the trust domain and environment
of this server, and the CA's denylist (``pki.denylist``, re-read when the file changes).
The identity is data: it never becomes a path or a setting.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from cryptography import x509

from modelseal.errors import CertificateError
from modelseal.pki import denylist, store
from modelseal.pki.identity import Identity
from modelseal.pki.verify import uri_identity

log = logging.getLogger("modelseal.server")

IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity", Identity)


class Refused(Exception):
    """A request refused before any handler: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class DenylistCache:
    """The CA's denylist, re-read only when ``revoked.json`` changes (inode, size, mtime:
    the file is replaced by rename). A malformed list refuses every request (fail closed)."""

    folder: Path
    _stamp: tuple[int, int, int] | None = None
    _list: denylist.Denylist = field(default_factory=lambda: denylist.Denylist({}))

    def current(self) -> denylist.Denylist:
        try:
            st = os.stat(self.folder / denylist.FILE)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._list = denylist.load(self.folder)
            self._stamp = stamp
        return self._list


@dataclass
class Authorizer:
    """The per-request identity check of one server: its trust domain and environment."""

    trust_domain: str
    env: str
    revoked: DenylistCache

    @classmethod
    def for_server(cls, trust_domain: str, env: str, ca_folder: Path | None = None) -> Authorizer:
        return cls(trust_domain, env, DenylistCache(ca_folder or store.ca_dir()))

    def identity(self, der: bytes | None) -> Identity:
        """The identity of the verified leaf ``der``, or ``Refused``."""
        if not der:
            raise Refused(401, "a client certificate is required")
        try:
            leaf = x509.load_der_x509_certificate(der)
            ident = uri_identity(leaf)
        except (ValueError, CertificateError):
            raise Refused(403, "the client certificate names no valid identity") from None
        if ident.trust_domain != self.trust_domain:
            raise Refused(403, f"identity {ident} is not of trust domain {self.trust_domain}")
        try:
            listed = self.revoked.current().revoked(leaf.serial_number)
        except CertificateError:
            log.error("the denylist cannot be read; refusing requests")
            raise Refused(503, "the revocation list is unavailable") from None
        if listed:
            raise Refused(403, f"certificate {denylist.serial_hex(leaf.serial_number)} is revoked")
        if ident.env != self.env:
            raise Refused(403, f"identity {ident} is of environment {ident.env}, this server serves {self.env}")
        return ident


def peer_der(request: web.Request) -> bytes | None:
    """The verified peer certificate (DER) of the request's TLS connection, or None."""
    transport = request.transport
    if transport is None:
        return None
    obj = transport.get_extra_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return None
    return obj.getpeercert(binary_form=True)


def middleware(auth: Authorizer) -> Middleware:
    """The aiohttp middleware: set ``request[IDENTITY]`` or answer 401/403/503 with a
    one-line JSON reason."""

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            request[IDENTITY] = auth.identity(peer_der(request))
        except Refused as r:
            log.info("refused %s %s: %s", request.method, request.path[:200].encode("unicode_escape"), r.reason)
            return web.json_response({"errors": [{"code": "DENIED", "message": r.reason}]}, status=r.status)
        return await handler(request)

    return identify


__all__ = ["IDENTITY", "Authorizer", "DenylistCache", "Refused", "middleware", "peer_der"]
