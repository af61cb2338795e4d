"""Who is calling: the aiohttp middleware that turns the verified client certificate into
an ``Identity`` on the request, or refuses the request.

The chain was verified by OpenSSL at the handshake against ``ca.pem`` (``server.tls``:
TLS 1.3 only, ``CERT_REQUIRED``, no session resumption), so a connection without a valid
client certificate never reaches a handler. Python's ``ssl`` has no verify callback, so
what OpenSSL cannot know is checked here, per request, on the leaf OpenSSL accepted: its
one ``spiffe://`` URI SAN (``pki.verify.uri_identity``), its validity period *now* (OpenSSL
checked it once, at the handshake, and a kept-alive connection can outlive the
certificate), the trust domain and environment of this server, and the CA's denylist
(``pki.denylist``, re-read when the file changes). The leaf is parsed once per connection
(``PeerLeaf``, kept by ``hygiene.GuardedHandler``). A refusal about the certificate (401,
403) also closes the connection: it would be refused again on every request; the
application's handshake observers (``server.handshakes.OBSERVERS``) hear of it, with its
kind (expired, revoked, wrong-environment, wrong-trust-domain).
The identity is data: it never becomes a path or a setting.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from cryptography import x509

from modelseal.errors import CertificateError
from modelseal.pki import denylist, store
from modelseal.pki.identity import Identity
from modelseal.pki.verify import uri_identity
from modelseal.server.handshakes import OBSERVERS, Handshake, notify, source_of

log = logging.getLogger("modelseal.server")

IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity", Identity)


class Refused(Exception):
    """A request refused before any handler: an HTTP status, a one-line reason and, for a
    refusal of the certificate, its ``kind`` (one of ``server.handshakes.REASONS``)."""

    def __init__(self, status: int, reason: str, kind: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind


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


@dataclass(frozen=True)
class PeerLeaf:
    """What the per-request check needs of a connection's verified leaf, parsed once:
    its serial, its identity (None: it names no valid one) and validity (POSIX seconds)."""

    serial: int
    identity: Identity | None
    not_before: float
    not_after: float


def parse_leaf(der: bytes | None) -> PeerLeaf | None:
    """The ``PeerLeaf`` of the DER leaf ``der``; None without one."""
    if not der:
        return None
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError:
        return PeerLeaf(0, None, -math.inf, math.inf)
    try:
        ident: Identity | None = uri_identity(leaf)
    except (ValueError, CertificateError):
        ident = None
    return PeerLeaf(
        leaf.serial_number, ident, leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    )


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Authorizer:
    """The per-request identity check of one server: its trust domain and environment."""

    trust_domain: str
    env: str
    revoked: DenylistCache

    @classmethod
    def for_server(cls, trust_domain: str, env: str, ca_folder: Path | None = None) -> Authorizer:
        return cls(trust_domain, env, DenylistCache(ca_folder or store.ca_dir()))

    def identity(self, der: bytes | None, now: float | None = None) -> Identity:
        """The identity of the verified leaf ``der``, or ``Refused``."""
        return self.check(parse_leaf(der), now)

    def check(self, peer: PeerLeaf | None, now: float | None = None) -> Identity:
        """The identity of the connection's parsed leaf ``peer`` at ``now``, or ``Refused``."""
        if peer is None:
            raise Refused(401, "a client certificate is required")
        ident = peer.identity
        if ident is None:
            raise Refused(403, "the client certificate names no valid identity", "other")
        t = time.time() if now is None else now
        if t >= peer.not_after:
            raise Refused(
                401, f"the client certificate expired at {_utc(peer.not_after)}: connect with a renewed one", "expired"
            )
        if t < peer.not_before:
            raise Refused(401, f"the client certificate is not valid before {_utc(peer.not_before)}", "expired")
        if ident.trust_domain != self.trust_domain:
            raise Refused(403, f"identity {ident} is not of trust domain {self.trust_domain}", "wrong-trust-domain")
        try:
            listed = self.revoked.current().revoked(peer.serial)
        except CertificateError:
            log.error("the denylist cannot be read; refusing requests")
            raise Refused(503, "the revocation list is unavailable") from None
        if listed:
            raise Refused(403, f"certificate {denylist.serial_hex(peer.serial)} is revoked", "revoked")
        if ident.env != self.env:
            raise Refused(
                403,
                f"identity {ident} is of environment {ident.env}, this server serves {self.env}",
                "wrong-environment",
            )
        return ident


def transport_der(transport: object) -> bytes | None:
    """The verified peer certificate (DER) of a TLS transport, or None."""
    get = getattr(transport, "get_extra_info", None)
    obj = get("ssl_object") if get is not None else None
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return None
    return obj.getpeercert(binary_form=True)


def peer_der(request: web.Request) -> bytes | None:
    """The verified peer certificate (DER) of the request's TLS connection, or None."""
    return transport_der(request.transport)


def connection_peer(transport: object) -> PeerLeaf | None:
    """The parsed leaf of a TLS transport (``hygiene.GuardedHandler`` keeps it per connection)."""
    return parse_leaf(transport_der(transport))


def request_peer(request: web.Request) -> PeerLeaf | None:
    """The request's connection leaf: the one its handler parsed at connect, else parsed now."""
    cached = getattr(request.protocol, "peer", None)
    if isinstance(cached, PeerLeaf):
        return cached
    return parse_leaf(peer_der(request))


def from_a_page(request: web.Request) -> bool:
    """Whether a browser sent ``request`` on a web page's behalf: it carries ``Origin`` (a
    script's or a form's request) or a ``Sec-Fetch-Site`` other than ``none`` (anything
    but the user typing the address). A browser that holds a client certificate presents it
    on such requests too, so the API, whose clients are programs, refuses them: no site an
    officer visits can call it with the officer's certificate (the console's own forms post
    to ``/ui``, under their CSRF token)."""
    return "Origin" in request.headers or request.headers.get("Sec-Fetch-Site", "none") != "none"


def middleware(auth: Authorizer, open_prefix: str | None = None) -> Middleware:
    """The aiohttp middleware: set ``request[IDENTITY]`` or answer 401/403/503 with a
    one-line JSON reason; after a 401 or 403 the connection is closed.

    ``open_prefix`` (the web console's ``/ui``, when it is on and the listener asks for a
    client certificate without requiring one): a request under it on a connection without
    a certificate goes on with no identity (the console's own middleware then requires a
    session); a certificate presented there is checked as everywhere else. Everywhere else,
    a request a web page made (``from_a_page``) is refused, 403, before anything else."""

    def is_open(path: str) -> bool:
        return open_prefix is not None and (path == open_prefix or path.startswith(open_prefix + "/"))

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request_peer(request)
        if is_open(request.path):
            if peer is None:
                return await handler(request)
        elif from_a_page(request):
            return web.json_response(
                {"errors": [{"code": "DENIED", "message": "the API answers no request made by a web page"}]}, status=403
            )
        try:
            request[IDENTITY] = auth.check(peer)
        except Refused as r:
            log.info("refused %s %s: %s", request.method, request.path[:200].encode("unicode_escape"), r.reason)
            observers = request.app.get(OBSERVERS)
            if r.kind is not None and observers:
                where = request.transport.get_extra_info("peername") if request.transport is not None else None
                actor = peer.identity.uri if peer is not None and peer.identity is not None else None
                notify(observers, Handshake(time.time(), source_of(where), False, "", "", r.kind, actor))
            resp = web.json_response({"errors": [{"code": "DENIED", "message": r.reason}]}, status=r.status)
            if r.status in (401, 403):
                resp.force_close()
            return resp
        return await handler(request)

    return identify


__all__ = [
    "IDENTITY",
    "Authorizer",
    "DenylistCache",
    "PeerLeaf",
    "Refused",
    "connection_peer",
    "from_a_page",
    "middleware",
    "parse_leaf",
    "peer_der",
    "request_peer",
    "transport_der",
]
