"""``modelseal serve``'s listener: one TLS 1.3 mutual-TLS socket (``server.tls``) running an
aiohttp application until SIGTERM or SIGINT, then it stops accepting, lets open requests
finish (bounded) and returns. SIGHUP reloads the server certificate from ``--tls-dir``.
There is no plaintext listener.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from modelseal.errors import CertificateError
from modelseal.server import tls
from modelseal.server.identity import Authorizer

log = logging.getLogger("modelseal.server")

SHUTDOWN_GRACE = 10.0
AppFactory = Callable[[Authorizer], web.Application]


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


async def _run(listen: Listen, tls_dir: Path, app: web.Application) -> None:
    ctx = tls.server_context(tls_dir)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
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


def serve(
    listen: Listen, tls_dir: Path, build: AppFactory, env: str | None = None, ca_folder: Path | None = None
) -> None:
    """Run the application ``build(authorizer)`` until SIGTERM/SIGINT (returns after a clean shutdown)."""
    auth = authorizer_for(tls_dir, env, ca_folder)
    logging.basicConfig(level=logging.INFO, format="modelseal serve: %(message)s", stream=sys.stderr)
    asyncio.run(_run(listen, tls_dir, build(auth)))


__all__ = ["AppFactory", "Listen", "authorizer_for", "parse_listen", "serve"]
