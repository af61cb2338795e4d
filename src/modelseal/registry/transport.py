"""The registry client's HTTP transport: HTTPS over TLS 1.3 with mutual TLS and a pinned issuing CA.

Stdlib ``ssl`` + ``http.client``: no extra dependency, and the socket is ours, so the pin is
checked after the handshake and before a single byte of a request is sent
(``registry.tlsclient.pin_check``).

A mismatch raises ``pki.pins.PinMismatch`` and is a ``pin-mismatch`` security event in the
audit log. Connections are pooled per endpoint; a connection failure moves on to the next
endpoint given. ``TLS_DIR`` is re-read when its ``cert.pem`` changes (``cert renew``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from cryptography import x509

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.errors import CertificateError, ModelsealError, RegistryError
from modelseal.pki.pins import PinMismatch, parse_pin
from modelseal.registry.names import shown
from modelseal.registry.reference import Endpoint
from modelseal.registry.tlsclient import client_context, held_issuers, pin_check

_log = logging.getLogger("modelseal")
MAX_REPLY = (4 << 20) + 4096  # manifests are at most 4 MiB; error bodies far less
BodyFactory = Callable[[], Iterable[bytes]]
_NET_ERRORS = (OSError, http.client.HTTPException)  # ssl.SSLError is an OSError


class RegistryUnavailable(RegistryError):
    """No endpoint of the registry could be reached (after retries)."""


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes
    endpoint: Endpoint

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class Transport:
    """Pooled mutual-TLS connections to one registry reachable at one or more ``endpoints``."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        tls_dir: str | os.PathLike[str],
        pins: Sequence[str],
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        attempts: int | None = None,
        sink: AuditSink | None = None,
        pool_size: int = 8,
        issuers: str | os.PathLike[str] | None = None,
    ) -> None:
        if not endpoints:
            raise RegistryError("no registry endpoint given")
        if not pins:
            raise CertificateError(
                "no registry pins: give --pin (the pins 'modelseal ca pins' prints, a live and a backup one)"
                " or set [registry] pins in config.toml or MODELSEAL_REGISTRY_PINS"
            )
        for p in pins:
            parse_pin(p)
        self.endpoints = list(endpoints)
        self.tls_dir = Path(tls_dir)
        self.issuers = Path(issuers) if issuers is not None else None
        self.pins = list(pins)
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.attempts = attempts if attempts is not None else len(self.endpoints) + 2
        self.use_openssl_chain = True
        self._sink = sink
        self._pool: dict[Endpoint, list[http.client.HTTPSConnection]] = {e: [] for e in self.endpoints}
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._current = 0
        self._stamp: tuple[int, int, int] | None = None
        self._ctx, self._held = self._load()

    # ---- TLS material ---------------------------------------------------------------

    def _cert_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = (self.tls_dir / "cert.pem").stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> tuple[ssl.SSLContext, list[x509.Certificate]]:
        self._stamp = self._cert_stamp()
        return client_context(self.tls_dir), held_issuers(self.tls_dir, self.issuers)

    def _context(self) -> tuple[ssl.SSLContext, list[x509.Certificate]]:
        with self._lock:
            if self._cert_stamp() != self._stamp:  # renewed since: new connections present the new one
                self._ctx, self._held = self._load()
            return self._ctx, self._held

    # ---- connections ------------------------------------------------------------------

    def endpoint(self) -> Endpoint:
        with self._lock:
            return self.endpoints[self._current % len(self.endpoints)]

    def _failed(self, ep: Endpoint) -> None:
        with self._lock:
            if self.endpoints[self._current % len(self.endpoints)] == ep:
                self._current += 1

    def _connect(self, ep: Endpoint) -> http.client.HTTPSConnection:
        ctx, held = self._context()
        conn = http.client.HTTPSConnection(ep.host, ep.port, context=ctx, timeout=self.connect_timeout)
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as e:
            conn.close()
            raise CertificateError(
                f"{ep}: the server's certificate is refused ({shown(str(e.verify_message))})"
            ) from None
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            pin_check(sock, self.pins, held, use_openssl_chain=self.use_openssl_chain)
        except PinMismatch as e:
            der = sock.getpeercert(binary_form=True) or b""
            conn.close()
            self._report(ep, der, e)
            raise PinMismatch(f"{ep}: {e}") from None
        except BaseException:
            conn.close()
            raise
        sock.settimeout(self.timeout)
        return conn

    def _report(self, ep: Endpoint, der: bytes, e: PinMismatch) -> None:
        _log.warning("pin mismatch at registry %s: %s", ep, e)
        try:
            sink = self._sink
            if sink is None:
                from modelseal.keys.service import default_sink

                sink = default_sink()
            sink.emit(
                AuditEvent("pin-mismatch", f"registry:{ep}", "PinMismatch", None, hashlib.sha256(der).hexdigest())
            )
        except ModelsealError as err:  # the connection is refused all the same
            _log.error("the pin mismatch at %s could not be written to the audit log: %s", ep, err)

    def _take(self, ep: Endpoint) -> tuple[http.client.HTTPSConnection, bool]:
        with self._lock:
            idle = self._pool[ep]
            if idle:
                return idle.pop(), True
        return self._connect(ep), False

    def _give(self, ep: Endpoint, conn: http.client.HTTPSConnection) -> None:
        with self._lock:
            if len(self._pool[ep]) < self._pool_size:
                self._pool[ep].append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._pool.values() for c in idle]
            for idle in self._pool.values():
                idle.clear()
        for c in conns:
            c.close()

    # ---- requests ---------------------------------------------------------------------

    @contextlib.contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | BodyFactory | None = None,
        retry: bool = True,
    ) -> Iterator[tuple[http.client.HTTPResponse, Endpoint]]:
        """Send one request and yield the live response (body unread) and the endpoint that
        answered. Connection failures before a response are retried on the next endpoint
        (only once, on a fresh connection, unless ``retry``). A connection whose response
        was read to the end goes back to the pool."""
        if not path.startswith(("/v2/", "/modelseal/v1/")) or any(c in path for c in " \r\n\x00#"):
            raise RegistryError("refusing a request path outside /v2/ and /modelseal/v1/")
        hdrs = {"User-Agent": "modelseal", **(headers or {})}
        if isinstance(body, bytes):
            hdrs["Content-Length"] = str(len(body))
        elif body is None and method in ("PUT", "POST", "PATCH"):
            hdrs["Content-Length"] = "0"
        last: BaseException | None = None
        tries = self.attempts if retry else 2
        for attempt in range(tries):
            ep = self.endpoint()
            resp: http.client.HTTPResponse | None = None
            try:
                conn, reused = self._take(ep)
            except _NET_ERRORS as e:
                last = e
                self._failed(ep)
                time.sleep(min(2.0, 0.05 * 2**attempt))
                continue
            try:
                payload = body() if callable(body) else body
                conn.request(method, path, body=payload, headers=hdrs)
                resp = conn.getresponse()
            except _NET_ERRORS as e:
                conn.close()
                last = e
                if not reused:
                    self._failed(ep)
                if not retry and not reused:
                    break
                continue
            try:
                yield resp, ep
            except BaseException:
                conn.close()
                raise
            if resp.isclosed() and not resp.will_close:
                self._give(ep, conn)
            else:
                conn.close()
            return
        raise RegistryUnavailable(
            f"cannot reach the registry at {', '.join(map(str, self.endpoints))}: {_reason(last)}"
        ) from None

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | BodyFactory | None = None,
        retry: bool = True,
        limit: int = MAX_REPLY,
    ) -> Reply:
        """One request with its whole reply body read (refused above ``limit`` bytes)."""
        for attempt in range(2):
            try:
                with self.stream(method, path, headers=headers, body=body, retry=retry) as (resp, ep):
                    length = resp.getheader("Content-Length")
                    if method != "HEAD" and length is not None and (not length.isdigit() or int(length) > limit):
                        raise RegistryError(f"the registry's reply to {method} is over {limit} bytes")
                    data = resp.read(limit + 1)  # b"" for HEAD, and the connection is reusable
                    if len(data) > limit:
                        raise RegistryError(f"the registry's reply to {method} is over {limit} bytes")
                    return Reply(resp.status, resp.headers, data, ep)
            except _NET_ERRORS as e:  # the connection broke while the body was read
                if not retry or attempt:
                    raise RegistryUnavailable(f"the connection to the registry broke: {_reason(e)}") from None
        raise AssertionError("unreachable")

    def resolve_location(self, location: str | None, base: str) -> str:
        """A ``Location`` header as a request path: relative ones against ``base``; absolute
        ones only if they name an endpoint of this registry over https."""
        if not location or len(location) > 8192 or any(c in location for c in " \r\n\x00"):
            raise RegistryError("the registry answered without a usable Location")
        parts = urlsplit(location)
        if parts.scheme or parts.netloc:
            port = parts.port if parts.port is not None else 443
            host = (parts.hostname or "").lower()
            if parts.scheme != "https" or not any(e.host.lower() == host and e.port == port for e in self.endpoints):
                raise RegistryError(f"the registry redirected to another host ({shown(location)}): refused")
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        else:
            joined = urlsplit(urljoin(base, location))
            path = joined.path + (f"?{joined.query}" if joined.query else "")
        if not path.startswith("/v2/"):
            raise RegistryError(f"the registry's Location {shown(location)} is outside /v2/")
        return path


def _reason(e: BaseException | None) -> str:
    if e is None:
        return "no endpoint answered"
    if isinstance(e, ssl.SSLError):
        return f"TLS failure ({shown(str(e.reason or type(e).__name__))})"
    if isinstance(e, OSError) and e.strerror:
        return shown(e.strerror)
    return type(e).__name__


def body_of(path: Path, offset: int, length: int, block: int = 1 << 20) -> BodyFactory:
    """A re-playable request body: ``length`` bytes of the file at ``path`` from ``offset``,
    read ``block`` bytes at a time (constant memory)."""

    def gen() -> Iterator[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < length:
                data = os.pread(fd, min(block, length - done), offset + done)
                if not data:
                    raise RegistryError(f"{path} shrank while it was being sent")
                done += len(data)
                yield data
        finally:
            os.close(fd)

    return gen


__all__ = [
    "BodyFactory",
    "RegistryUnavailable",
    "Reply",
    "Transport",
    "body_of",
]
