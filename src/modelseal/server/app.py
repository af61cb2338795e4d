"""``modelseal serve``: the aiohttp application.

``make_app`` builds the application: the identity middleware (``server.identity``) in
front of every route, the OCI distribution base endpoint ``GET /v2/``, and, given a
registry, the OCI distribution routes (``server.oci``) and the online garbage collector
(``registry.gc``), a background task that runs one bounded pass every ``gc_interval``
seconds in the routes' thread pool and closes the registry when the application stops;
given an issuer, the renewal endpoint of ``server.certs_api``.
The listener that runs it is ``server.runner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from modelseal.pki.backend import Issuer
from modelseal.registry import gc
from modelseal.registry.service import Registry
from modelseal.server import certs_api, oci
from modelseal.server.identity import IDENTITY, Authorizer, middleware

log = logging.getLogger("modelseal.server")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
MAX_BODY = 1 << 20  # request.read()/post() only; the OCI routes stream and bound their own bodies
GC_INTERVAL = 60.0
BODY_TIMEOUT = 30.0


async def base(request: web.Request) -> web.Response:
    """``GET /v2/``: the OCI base endpoint; 200 ``{}`` for an authorized identity."""
    assert IDENTITY in request  # the middleware refused otherwise
    return web.json_response({}, headers={API_VERSION_HEADER: API_VERSION})


async def _add_version_header(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2/"):
        response.headers.setdefault(API_VERSION_HEADER, API_VERSION)


def _collector(registry: Registry, interval: float) -> object:
    async def run(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await asyncio.get_running_loop().run_in_executor(app[oci.POOL], gc.collect, registry)
                except Exception as e:  # one failed pass stops nothing; the next one retries
                    log.error("gc pass failed: %s", type(e).__name__)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        registry.close()

    return run


def make_app(
    auth: Authorizer,
    registry: Registry | None = None,
    gc_interval: float = GC_INTERVAL,
    body_timeout: float = BODY_TIMEOUT,
    issuer: Issuer | None = None,
) -> web.Application:
    """The application: every request passes ``auth`` first; with ``registry``, the OCI API;
    with ``issuer``, ``POST /modelseal/v1/certificates/renew`` (``server.certs_api``)."""
    app = web.Application(middlewares=[middleware(auth)], client_max_size=MAX_BODY)
    app.router.add_get("/v2/", base)
    app.on_response_prepare.append(_add_version_header)
    if registry is not None:
        oci.add_routes(app, registry, body_timeout)
        app.cleanup_ctx.append(_collector(registry, gc_interval))  # type: ignore[arg-type]
    if issuer is not None:
        certs_api.add_routes(app, issuer)
    return app


__all__ = ["API_VERSION", "API_VERSION_HEADER", "make_app"]
