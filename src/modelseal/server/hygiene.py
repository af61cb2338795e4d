"""Connection hygiene of one ``modelseal serve`` worker: the accept loop and the bounds every
connection lives under (docs/serve.md, "Connection hygiene").

``Listener`` accepts from the listening socket itself (not ``loop.create_server``), so it
can bound what asyncio's server cannot. A connection is *in its handshake* from accept
until its TLS handshake completes (``handshake_timeout``), then *established*. Per worker:
at most ``max_connections`` of both together (at the cap it stops accepting and the kernel
queues, or another worker takes them); of those, at most ``max_handshakes`` in their
handshake, and at most ``max_handshakes_per_source`` from one source address (an IPv6
/64 counts as one address), so sockets that never finish a handshake (no certificate
needed) cannot take the share kept for established, authenticated connections. A
connection beyond a handshake bound is closed at once (a reset), with one rate-limited
warning line (``Throttled``), never a line per connection. Each connection gets the TLS
context current at accept (``tls.LiveContext``), so a reload never touches an open one.
Every handshake, completed (its version and cipher) or failed (its reason,
``handshakes.classify``), is told to the application's observers (``server.handshakes``:
the metrics counter, the monitor's network events).

``GuardedHandler`` is aiohttp's ``RequestHandler`` with a header deadline, which aiohttp
lacks (its keep-alive timer is the only bound on a request that never completes): the
request line and headers must be complete within ``header_timeout`` of the connection
being made, or of the first byte of a later request on a kept-alive connection, and within
``max_header_bytes``. A slowloris client is closed, whatever its pace. It parses the
verified client certificate once per connection (``identity.PeerLeaf``, which the identity
middleware reads) and closes the connection when that certificate expires while idle (the
middleware refuses an expired certificate per request). A malformed request (a bad request
line or header: aiohttp's parser error) gets a one-line OCI-style 400 and the connection is
closed, before any identity check; the log gets one short rate-limited line, never a
traceback. Idle keep-alive, header line, field and count limits are aiohttp's own
(``handler_kwargs``). Body timeouts and upload limits belong to the routes (``server.app``).
With the web console on, a connection may complete its handshake without a client
certificate; such connections have their own bound (``max_anonymous``, and per source
address), beyond which one is closed as soon as its handshake completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from modelseal.server.handshakes import Handshake, Observer, classify, notify, source_of
from modelseal.server.identity import PeerLeaf, connection_peer
from modelseal.server.tls import LiveContext

log = logging.getLogger("modelseal.server")

LOG_EVERY = 10.0  # seconds between two lines of one throttled kind


@dataclass(frozen=True)
class Limits:
    """The bounds of one worker. Times are seconds, sizes bytes."""

    handshake_timeout: float = 5.0  # accept to the end of the TLS handshake
    header_timeout: float = 15.0  # connect (or a later request's first byte) to the end of its headers
    keepalive_timeout: float = 75.0  # idle between requests (aiohttp's timer)
    max_line_size: int = 8190  # the request line, so a URL of at most about 8 KiB
    max_field_size: int = 8190  # one header line
    max_headers: int = 64  # header count
    max_header_bytes: int = 64 << 10  # a whole header block
    max_connections: int = 512  # per worker, established and in their handshake together
    max_handshakes: int = 128  # per worker, in their handshake at once: 384 of 512 stay for established ones
    max_handshakes_per_source: int = 32  # per worker and source address (IPv6: per /64)
    # Established without a client certificate (only with the web console on, which then
    # asks for one without requiring it): browsers signing in or holding a session. Their
    # own bound, so that anonymous connections cannot take the authenticated ones' share.
    max_anonymous: int = 64  # per worker
    max_anonymous_per_source: int = 16  # per worker and source address
    shutdown_grace: float = 10.0  # SIGTERM: in-flight requests get this long (aiohttp: twice, bounded)

    def handler_kwargs(self) -> dict[str, Any]:
        """aiohttp ``RequestHandler`` arguments (access logging off: the middleware logs refusals)."""
        return {
            "keepalive_timeout": self.keepalive_timeout,
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "max_headers": self.max_headers,
            "access_log": None,
        }


class Throttled:
    """One kind of log line, at most one per ``every`` seconds; each line counts the events
    since the previous one and names the latest."""

    def __init__(self, what: str, level: int = logging.WARNING, every: float = LOG_EVERY) -> None:
        self.what, self.level, self.every = what, level, every
        self._count = 0
        self._next = 0.0

    def note(self, latest: str) -> None:
        self._count += 1
        now = time.monotonic()
        if now >= self._next:
            log.log(self.level, "%s: %d since the last such line (latest: %s)", self.what, self._count, latest)
            self._count = 0
            self._next = now + self.every


MALFORMED = Throttled("malformed HTTP requests answered 400", logging.INFO)
EXPIRED = Throttled("connections closed when their client certificate expired", logging.INFO)
_PHRASES = {
    "LineTooLong": "a request line or header line is too long",
    "BadHttpMethod": "not an HTTP request method",
    "InvalidHeader": "a malformed header",
    "InvalidURLError": "a malformed request target",
    "BadStatusLine": "a malformed request line",
}


class GuardedHandler(RequestHandler):
    """``RequestHandler`` plus the header deadline and header byte cap, the per-connection
    client certificate (``peer``) and its expiry, and the one-line 400 for malformed HTTP;
    tells the listener's ``_Slot`` when the handshake is done and when the connection is gone."""

    __slots__ = ("_deadline", "_expiry", "_header_bytes", "_limits", "_slot", "peer")

    def __init__(self, manager: web.Server, limits: Limits, slot: _Slot | None = None) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **limits.handler_kwargs())
        self._limits = limits
        self._slot = slot
        self._deadline: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self.peer: PeerLeaf | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = connection_peer(transport)  # parsed once: the middleware reads it per request
        super().connection_made(transport)
        if self._slot is not None and not self._slot.established(self.peer is None):
            transport.close()  # asyncio calls this once the TLS handshake is complete
            return  # no certificate, and the anonymous connections are at their bound
        self._arm()  # a client that connects must send a request, not just hold the slot
        if self.peer is not None and self.peer.not_after < float("inf"):
            self._expiry = self._loop.call_later(max(0.0, self.peer.not_after - time.time()), self._cert_expired)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self._loop.call_later(self._limits.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._header_bytes = 0

    def _awaiting_headers(self) -> bool:
        # No request parsed yet, or the handler waits for the next one (between requests).
        return self._request_count == 0 or (self._waiter is not None and not self._waiter.done())

    def data_received(self, data: bytes) -> None:
        awaiting = self._awaiting_headers()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()  # a request line and its headers are complete
        elif awaiting and not self._force_close:
            self._arm()
            self._header_bytes += len(data)
            if self._header_bytes > self._limits.max_header_bytes:
                self._cut(f"request headers over {self._limits.max_header_bytes} bytes")

    def _headers_late(self) -> None:
        self._deadline = None
        if self._awaiting_headers() and not self._force_close:
            self._cut(f"request headers not complete within {self._limits.header_timeout:g} s")

    def _cut(self, why: str) -> None:
        self._disarm()
        log.info("closed a connection from %s: %s", _peer(self.transport), why)
        self.force_close()

    def _cert_expired(self) -> None:
        self._expiry = None
        if self.transport is None or self._force_close:
            return
        if not self._awaiting_headers():  # a request in flight finishes; the next one is refused (401)
            self._expiry = self._loop.call_later(1.0, self._cert_expired)
            return
        EXPIRED.note(_peer(self.transport))
        self.force_close()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """A parser error (a bad request line or header, 4xx): a fixed one-line OCI-style
        body, the connection closed, one throttled log line naming the error class only
        (the request's bytes are never echoed or logged). Server errors stay aiohttp's."""
        if status >= 500 or exc is None:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already")
        kind = type(exc).__name__
        MALFORMED.note(f"{_peer(self.transport)} {kind}")
        why = _PHRASES.get(kind, "a malformed HTTP request")
        body = {"errors": [{"code": "UNSUPPORTED", "message": f"bad request: {why}", "detail": {}}]}
        resp = web.json_response(body, status=status, headers={"Connection": "close"})
        resp.force_close()
        return resp

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        super().connection_lost(exc)
        if self._slot is not None:
            self._slot.release()


def _peer(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


class _Slot:
    """One accepted connection in the listener's counts: in its handshake, open, or gone."""

    __slots__ = ("anonymous", "listener", "source", "state")

    def __init__(self, listener: Listener, source: str) -> None:
        self.listener, self.source, self.state = listener, source, "handshake"
        self.anonymous = False

    def established(self, anonymous: bool = False) -> bool:
        """The handshake completed (``anonymous``: without a client certificate); False:
        close it, the anonymous connections are at their bound."""
        self.listener.moved(self, "open")
        return not anonymous or self.listener.admit_anonymous(self)

    def release(self) -> None:
        self.listener.moved(self, "gone")


def _negotiated(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """The protocol version and cipher suite a TLS transport negotiated."""
    obj = transport.get_extra_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return "", ""
    cipher = obj.cipher()
    return obj.version() or "", cipher[0] if cipher else ""


def _reset(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # a reset, not a FIN: no TIME_WAIT kept for an abuser
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class Listener:
    """The accept loop of one worker on the (shared) listening socket ``sock``."""

    def __init__(
        self,
        sock: socket.socket,
        live: LiveContext,
        server: web.Server,
        limits: Limits,
        observers: Sequence[Observer] = (),
    ) -> None:
        self._sock = sock
        self._observers = observers  # told of every handshake (server.handshakes)
        self._live = live
        self._server = server
        self._limits = limits
        self.handshakes = 0
        self.established = 0
        self._per_source: dict[str, int] = {}
        self.anonymous = 0
        self._anon_per_source: dict[str, int] = {}
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._opening: set[asyncio.Task[None]] = set()
        self._dropped = Throttled("new connections closed at once (handshakes at their bound)")
        self._dropped_anonymous = Throttled("connections without a client certificate closed (at their bound)")
        self._accept_failed = Throttled("accept failed")
        self.accepted = 0

    def start(self) -> None:
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    def moved(self, slot: _Slot, to: str) -> None:
        """``slot`` finished its handshake (``open``) or is gone; the counts follow."""
        if slot.state in (to, "gone"):
            return
        if slot.state == "handshake":
            self.handshakes -= 1
            left = self._per_source.pop(slot.source, 1) - 1
            if left > 0:
                self._per_source[slot.source] = left
        else:
            self.established -= 1
            if slot.anonymous:
                slot.anonymous = False
                self.anonymous -= 1
                left = self._anon_per_source.pop(slot.source, 1) - 1
                if left > 0:
                    self._anon_per_source[slot.source] = left
        if to == "open":
            self.established += 1
        slot.state = to
        if self.handshakes + self.established < self._limits.max_connections:
            self._room.set()

    def admit_anonymous(self, slot: _Slot) -> bool:
        """Count ``slot`` as established without a certificate, or refuse it (False) at the
        bound per worker or per source address (one rate-limited line)."""
        lim, mine = self._limits, self._anon_per_source.get(slot.source, 0)
        if self.anonymous >= lim.max_anonymous or mine >= lim.max_anonymous_per_source:
            self._dropped_anonymous.note(f"{slot.source}, {self.anonymous} without a certificate, {mine} of its own")
            return False
        slot.anonymous = True
        self.anonymous += 1
        self._anon_per_source[slot.source] = mine + 1
        return True

    def _over(self, source: str) -> str | None:
        lim = self._limits
        if self._per_source.get(source, 0) >= lim.max_handshakes_per_source:
            return f"{source}, at {lim.max_handshakes_per_source} handshakes from one address"
        if self.handshakes >= lim.max_handshakes:
            return f"{source}, at {lim.max_handshakes} handshakes in this worker"
        return None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.handshakes + self.established >= self._limits.max_connections:
                self._room.clear()  # at the cap: stop accepting, the kernel queues
                await self._room.wait()
                continue
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as e:  # EMFILE, ENOBUFS, a connection reset while queued
                self._accept_failed.note(e.strerror or type(e).__name__)
                await asyncio.sleep(0.1)
                continue
            self.accepted += 1
            source = source_of(addr)
            why = self._over(source)
            if why is not None:
                _reset(conn)
                self._dropped.note(why)
                continue
            slot = _Slot(self, source)
            self.handshakes += 1
            self._per_source[source] = self._per_source.get(source, 0) + 1
            task = loop.create_task(self._open(conn, slot))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: GuardedHandler(self._server, self._limits, slot),
                conn,
                ssl=self._live.current,
                ssl_handshake_timeout=self._limits.handshake_timeout,
                ssl_shutdown_timeout=self._limits.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as e:
            # A refused handshake (no or a bad client certificate, TLS 1.2, a timeout):
            # OpenSSL already answered with an alert, and no handler ever saw the connection.
            conn.close()
            slot.release()
            if self._observers:
                notify(self._observers, Handshake(time.time(), slot.source, False, "", "", classify(e), None))
            return
        except BaseException:
            conn.close()
            slot.release()
            raise
        if self._observers:
            version, cipher = _negotiated(transport)
            notify(self._observers, Handshake(time.time(), slot.source, True, version, cipher, None, None))

    async def stop(self) -> None:
        """Stop accepting and drop connections still in their handshake; open HTTP
        connections are the runner's to finish (``AppRunner.cleanup``)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        self._sock.close()


__all__ = ["GuardedHandler", "Limits", "Listener", "Throttled", "source_of"]
