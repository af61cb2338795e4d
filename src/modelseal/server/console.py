"""The web console under ``/ui/`` (docs/console.md): one more face over the same server.

``install`` mounts it on the application ``server.app`` builds: the pages of the
``console_<page>`` modules in navigation order, sign-in and sign-out
(``server.console_login``), the vendored files of ``console_static/`` (read once at start,
served by name only), the console middleware and the security headers of every ``/ui``
response, and ``POST /modelseal/v1/console/login``.

The middleware runs after ``server.identity``'s, which lets a connection without a client
certificate reach ``/ui`` only. Every ``/ui`` request but sign-in and the static files needs
a live session (``console_login.session_of``); the middleware then sets
``console_page.SESSION`` and ``identity.IDENTITY``, so a page's decisions are the API's. A
POST whose ``Origin`` is not this server's is refused. A refusal (``authz.Refusal``,
``console_page.FormRefused``, a typed ``ModelsealError``) becomes a one-line HTML page with
its status; anything else a one-line 500, never a trace.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from modelseal.errors import (
    AccessDenied,
    BackupError,
    ConsoleError,
    KeyNotFound,
    KeyProviderError,
    ModelsealError,
    StorageError,
)
from modelseal.governance.approvals import Conflict, UnknownApproval
from modelseal.pki.identity import parse
from modelseal.server import (
    authz,
    console_approvals,
    console_artifacts,
    console_audit,
    console_certs,
    console_evidence,
    console_keys,
    console_login,
    console_overview,
    console_policies,
    console_review,
    console_usage,
)
from modelseal.server.console_login import API_LOGIN, STATE, ConsoleState, error_page, is_console
from modelseal.server.console_page import CONSOLE, POOL, PREFIX, SESSION, ConsoleDeps, FormRefused
from modelseal.server.console_sessions import ConsoleSessions, ConsoleSettings
from modelseal.server.identity import IDENTITY, Authorizer, request_peer
from modelseal.util.home import modelseal_home

log = logging.getLogger("modelseal.server")

STATIC = Path(__file__).with_name("console_static")
PAGES = (  # navigation order (docs/console.md)
    console_overview,
    console_artifacts,
    console_keys,
    console_certs,
    console_audit,
    console_approvals,
    console_review,
    console_policies,
    console_evidence,
)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: Chromium would then send Origin: null on our own POSTs
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml", ".png": "image/png"}
_STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,60}\.(css|js|svg|png)")
_OPEN = (f"{PREFIX}/login", f"{PREFIX}/login/certificate")
# A typed error a page raised, as a status: the first class it is an instance of.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (AccessDenied, 403),
    (ConsoleError, 403),
    (UnknownApproval, 404),
    (KeyNotFound, 404),
    (Conflict, 409),
    (StorageError, 503),
    (KeyProviderError, 503),
    (BackupError, 503),
)


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not is_console(request.path):
        return await handler(request)
    try:
        if request.method == "POST" and not console_login.origin_ok(request):
            return error_page(request, 403, "this form was posted from another origin")
        if request.path in _OPEN or request.path.startswith(f"{PREFIX}/static/"):
            return await handler(request)
        s = await console_login.session_of(request, request_peer(request))
        if s is None:
            if request.method in ("GET", "HEAD"):
                return console_login.see_other(f"{PREFIX}/login")
            return error_page(request, 401, "your console session has ended: sign in again")
        request[SESSION] = s
        request[IDENTITY] = parse(s.identity)
        return await handler(request)
    except authz.Refusal as r:
        return error_page(request, r.status_code, r.reason_line)
    except FormRefused as f:
        return error_page(request, 403, f.reason_line)
    except web.HTTPRedirection:
        raise
    except web.HTTPException as e:
        return error_page(request, e.status, e.text or e.reason)
    except ModelsealError as e:
        status = next((code for cls, code in _STATUS if isinstance(e, cls)), 400)
        return error_page(request, status, str(e))
    except Exception as e:  # never a trace in a page
        where = request.path[:100].encode("unicode_escape").decode("ascii")  # one line, whatever the path
        log.error("console %s %s failed: %s", request.method[:10], where, type(e).__name__)
        return error_page(request, 500, "the console failed on this request; the server log says more")


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    if is_console(request.path):
        for name, value in HEADERS.items():
            response.headers[name] = value


async def static(request: web.Request) -> web.Response:
    """``GET /ui/static/NAME``: a vendored file of ``console_static/`` (by name only)."""
    found = request.app[STATE].files.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound(text="no such file")
    body, ctype = found
    return web.Response(body=body, content_type=ctype)


def _static_files() -> dict[str, tuple[bytes, str]]:
    out: dict[str, tuple[bytes, str]] = {}
    if STATIC.is_dir():
        for p in sorted(STATIC.iterdir()):
            if _STATIC_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                out[p.name] = (p.read_bytes(), _TYPES[p.suffix])
    return out


def install(
    app: web.Application,
    settings: ConsoleSettings,
    auth: Authorizer,
    governance: Any,
    registry: Any = None,
    issuer: Any = None,
) -> None:
    """Mount the console on ``app`` (whose first middleware is ``server.identity``'s with
    ``/ui`` open), its sessions on the governance database of ``governance``."""
    sessions = ConsoleSessions.open(governance.target, idle=settings.idle, length=settings.session)
    app[STATE] = ConsoleState(settings, sessions, auth, _static_files())
    app[CONSOLE] = ConsoleDeps(
        home=modelseal_home(),
        registry=registry,
        store=governance.store,
        policies=governance.policies,
        svc=governance.svc,
        catalog=governance.catalog,
        audit=getattr(governance.audit, "sink", governance.audit),
        ca=auth.revoked.folder,
        issuer=issuer,
        target=governance.target,
    )
    app[POOL] = ThreadPoolExecutor(max_workers=4, thread_name_prefix="console")
    console_usage.install(app, app[CONSOLE].audit)  # one verified view of the audit log, for every page
    app.middlewares.append(console_middleware)
    app.on_response_prepare.append(_headers)
    r = app.router
    r.add_post(API_LOGIN, console_login.api_login)
    r.add_get(f"{PREFIX}/login", console_login.login_page)
    r.add_post(f"{PREFIX}/login", console_login.login_link)
    r.add_post(f"{PREFIX}/login/certificate", console_login.login_certificate)
    r.add_post(f"{PREFIX}/logout", console_login.logout)
    r.add_get(PREFIX + "/static/{name}", static)
    r.add_get(PREFIX, _redirect_home)
    for page in PAGES:
        page.add_routes(app)

    async def close(app: web.Application) -> None:
        app[POOL].shutdown(wait=True)
        sessions.close()

    app.on_cleanup.append(close)


async def _redirect_home(request: web.Request) -> web.StreamResponse:
    return console_login.see_other(f"{PREFIX}/")


__all__ = ["HEADERS", "console_middleware", "install"]
