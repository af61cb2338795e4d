"""``modelseal serve``: the aiohttp application.

``make_app`` builds the application: the identity middleware (``server.identity``) in
front of every route, and the OCI distribution base endpoint ``GET /v2/``. The listener
that runs it is ``server.runner``.
"""

from __future__ import annotations

import logging

from aiohttp import web

from modelseal.server.identity import IDENTITY, Authorizer, middleware

log = logging.getLogger("modelseal.server")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
MAX_BODY = 1 << 20  # no route takes a body yet


async def base(request: web.Request) -> web.Response:
    """``GET /v2/``: the OCI base endpoint; 200 ``{}`` for an authorized identity."""
    assert IDENTITY in request  # the middleware refused otherwise
    return web.json_response({}, headers={API_VERSION_HEADER: API_VERSION})


def make_app(auth: Authorizer) -> web.Application:
    """The application: every request passes ``auth`` first."""
    app = web.Application(middlewares=[middleware(auth)], client_max_size=MAX_BODY)
    app.router.add_get("/v2/", base)
    return app


__all__ = ["API_VERSION", "API_VERSION_HEADER", "make_app"]
