"""``modelseal serve``: the aiohttp application and its TLS listener.

``make_app`` builds the application: the identity middleware (``server.identity``) in
front of every route, and the OCI distribution base endpoint ``GET /v2/``. ``serve`` runs it
on one TLS 1.3 mutual-TLS listener (``server.tls``) until SIGTERM or SIGINT, then stops
accepting, lets open requests finish (bounded) and returns. SIGHUP reloads the server
certificate from ``--tls-dir``. There is no plaintext listener.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from modelseal.errors import CertificateError
from modelseal.server import tls
from modelseal.server.identity import IDENTITY, Authorizer, middleware

log = logging.getLogger("modelseal.server")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
MAX_BODY = 1 << 20  # no route takes a body yet
SHUTDOWN_GRACE = 10.0


async def base(request: web.Request) -> web.Response:
    """``GET /v2/``: the OCI base endpoint; 200 ``{}`` for an authorized identity."""
    assert IDENTITY in request  # the middleware refused otherwise
    return web.json_response({}, headers={API_VERSION_HEADER: API_VERSION})


def make_app(auth: Authorizer) -> web.Application:
    """The application: every request passes ``auth`` first."""
    app = web.Application(middlewares=[middleware(auth)], client_max_size=MAX_BODY)
    app.router.add_get("/v2/", base)
    return app


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen takes HOST:PORT, got {text[:80]!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Listen(host, int(port))


def authorizer_for(tls_dir: Path, env: str | None, ca_folder: Path | None = None) -> Authorizer:
    """The server's trust domain is its own certificate's; its environment is ``env`` or,
    if None, its own certificate's. A server certificate of another environment than
    ``env`` is refused at start."""
    own = tls.own_identity(tls_dir)
    if env is not None and env != own.env:
        raise CertificateError(f"the server certificate is of environment {own.env!r}, not --env {env!r}")
    return Authorizer.for_server(own.trust_domain, own.env, ca_folder)


async def _run(listen: Listen, tls_dir: Path, auth: Authorizer) -> None:
    ctx = tls.server_context(tls_dir)
    runner = web.AppRunner(make_app(auth), handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        try:
            tls.reload(ctx, tls_dir)
            log.warning("reloaded the server certificate from %s", tls_dir)
        except CertificateError as e:
            log.error("certificate reload refused, keeping the old one: %s", e)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        site = web.TCPSite(runner, listen.host, listen.port, ssl_context=ctx)
        await site.start()
        print(f"modelseal serve: listening on {listen.host}:{listen.port} (TLS 1.3, mutual)", file=sys.stderr)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def serve(listen: Listen, tls_dir: Path, env: str | None = None, ca_folder: Path | None = None) -> None:
    """Run the server until SIGTERM/SIGINT (returns after a clean shutdown)."""
    auth = authorizer_for(tls_dir, env, ca_folder)
    logging.basicConfig(level=logging.INFO, format="modelseal serve: %(message)s", stream=sys.stderr)
    asyncio.run(_run(listen, tls_dir, auth))


__all__ = ["API_VERSION", "API_VERSION_HEADER", "Listen", "authorizer_for", "make_app", "parse_listen", "serve"]
