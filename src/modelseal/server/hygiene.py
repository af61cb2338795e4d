"""Connection hygiene of one ``modelseal serve`` worker: the accept loop and the bounds every
connection lives under (docs/serve.md, "Connection hygiene").

``Listener`` accepts from the listening socket itself (not ``loop.create_server``), so it
can bound what asyncio's server cannot: at most ``max_connections`` connections per worker,
handshakes included (at the cap it stops accepting and the kernel queues, or another
worker takes them); a TLS handshake timeout; and each connection gets the TLS context
current at accept (``tls.LiveContext``), so a reload never touches an open connection.

``GuardedHandler`` is aiohttp's ``RequestHandler`` with a header deadline, which aiohttp
lacks (its keep-alive timer is the only bound on a request that never completes): the
request line and headers must be complete within ``header_timeout`` of the connection
being made, or of the first byte of a later request on a kept-alive connection, and within
``max_header_bytes``. A slowloris client is closed, whatever its pace. Idle keep-alive,
header line, field and count limits are aiohttp's own (``handler_kwargs``). Body timeouts
and upload limits belong to the routes (``server.app``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from modelseal.server.tls import LiveContext

log = logging.getLogger("modelseal.server")


@dataclass(frozen=True)
class Limits:
    """The bounds of one worker. Times are seconds, sizes bytes."""

    handshake_timeout: float = 10.0  # accept to the end of the TLS handshake
    header_timeout: float = 15.0  # connect (or a later request's first byte) to the end of its headers
    keepalive_timeout: float = 75.0  # idle between requests (aiohttp's timer)
    max_line_size: int = 8190  # the request line, so a URL of at most about 8 KiB
    max_field_size: int = 8190  # one header line
    max_headers: int = 64  # header count
    max_header_bytes: int = 64 << 10  # a whole header block
    max_connections: int = 512  # per worker, handshakes included
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


class GuardedHandler(RequestHandler):
    """``RequestHandler`` plus the header deadline and header byte cap; calls ``on_lost``
    once the connection is gone (the listener's connection slot)."""

    __slots__ = ("_deadline", "_header_bytes", "_limits", "_on_lost")

    def __init__(self, manager: web.Server, limits: Limits, on_lost: Callable[[], None]) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **limits.handler_kwargs())
        self._limits = limits
        self._on_lost = on_lost
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # a client that connects must send a request, not just hold the slot

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

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        self._on_lost()


def _peer(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


class Listener:
    """The accept loop of one worker on the (shared) listening socket ``sock``."""

    def __init__(self, sock: socket.socket, live: LiveContext, server: web.Server, limits: Limits) -> None:
        self._sock = sock
        self._live = live
        self._server = server
        self._limits = limits
        self._slots = asyncio.Semaphore(limits.max_connections)
        self._task: asyncio.Task[None] | None = None
        self._opening: set[asyncio.Task[None]] = set()
        self.accepted = 0

    def start(self) -> None:
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:  # EMFILE, ENOBUFS, a connection reset while queued
                self._slots.release()
                log.warning("accept failed: %s", e.strerror or type(e).__name__)
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            self.accepted += 1
            task = loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._slots.release()

        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: GuardedHandler(self._server, self._limits, release),
                conn,
                ssl=self._live.current,
                ssl_handshake_timeout=self._limits.handshake_timeout,
                ssl_shutdown_timeout=self._limits.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError):
            # A refused handshake (no or a bad client certificate, TLS 1.2, a timeout):
            # OpenSSL already answered with an alert, and no handler ever saw the connection.
            conn.close()
            release()
        except BaseException:
            conn.close()
            release()
            raise

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


__all__ = ["GuardedHandler", "Limits", "Listener"]
