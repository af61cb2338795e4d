"""With the web console on, the listener asks for a client certificate without requiring
one, so a client with no credential at all completes its handshake. Such connections have
their own bound per worker and per source address (``hygiene.Limits.max_anonymous``): held
open with a request per keep-alive period, they cannot take the slots of authenticated
clients (the red team's F5). A real ``runner.serve`` process, its real listener."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time

from modelseal.pki import ca as pki_ca
from tests.conftest import Env
from tests.test_serve_tls import TD, client, make_dir, request, running

# The application's shape with --console (server.app.make_app): /ui open to no certificate.
LAUNCH = """
import json, sys
from pathlib import Path
from aiohttp import web
from modelseal.server import identity, runner
from modelseal.server.hygiene import Limits

async def ok(request):
    return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

async def login(request):
    return web.Response(text="sign in", content_type="text/html")

def build(auth):
    app = web.Application(middlewares=[identity.middleware(auth, "/ui")])
    app.router.add_get("/v2/", ok)
    app.router.add_get("/ui/login", login)
    return app

runner.serve(runner.parse_listen(sys.argv[1]), Path(sys.argv[2]), build, "prod",
             workers=1, limits=Limits(**json.loads(sys.argv[3])), console=True)
"""


def _anonymous(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket | None:
    """A connection without a client certificate that got a /ui answer and stays open, or
    None when the server closed it."""
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1")
    try:
        s.sendall(f"GET /ui/login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        got = s.recv(4096)
    except (ssl.SSLError, ConnectionError, TimeoutError):
        got = b""
    if not got.startswith(b"HTTP/1.1 200"):
        s.close()
        return None
    return s


def test_connections_without_a_certificate_cannot_starve_authenticated_ones(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    limits = {"max_connections": 8, "max_anonymous": 4, "max_anonymous_per_source": 3, "keepalive_timeout": 60.0}
    argv = [sys.executable, "-c", LAUNCH, "127.0.0.1:{port}", str(tls_dir), json.dumps(limits)]
    with running(env, tls_dir, argv) as server:
        anon = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))  # no client certificate at all
        held = [_anonymous(anon, server.port) for _ in range(6)]
        kept = [s for s in held if s is not None]
        assert len(kept) == 3, held  # the bound per source address (every test client is 127.0.0.1)
        authed = client(env, "victim")
        assert request(authed, server.port) == 200  # the authenticated client still gets in
        kept.pop().close()
        deadline = time.monotonic() + 10
        while (again := _anonymous(anon, server.port)) is None:  # a freed slot is usable again
            assert time.monotonic() < deadline
            time.sleep(0.2)
        kept.append(again)
        for s in kept:
            s.close()
        assert "without a client certificate closed" in (env.work / "serve.log").read_text()
