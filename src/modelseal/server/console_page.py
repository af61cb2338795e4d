"""What every page of the web console (docs/console.md) is built from: the session the
console middleware (``server.console``) put on the request, the pieces of the server a
page reads (``ConsoleDeps``), Cedar decisions through the server's one decider
(``server.authz``: a page asks exactly what the API route it mirrors asks), the checked
form of a POST (its CSRF token compared in constant time), and the rendering of a
template under ``console_templates/`` with the layout, the navigation and the token.

Templates autoescape everything (Jinja2, ``StrictUndefined``); a page hands them data,
never markup, except the SVG of ``server.console_svg``, which escapes its own text.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import jinja2
from aiohttp import web

from modelseal.governance.model import Decision, Resource
from modelseal.keys.service import printable
from modelseal.server import authz
from modelseal.server.console_sessions import Session
from modelseal.server.identity import IDENTITY

T = TypeVar("T")

PREFIX = "/ui"
MAX_FORM = 64 << 10  # a console form is small: ids, a code, a reason, a window
TEMPLATES = Path(__file__).with_name("console_templates")


@dataclass
class ConsoleDeps:
    """The pieces of one worker a page reads. ``None``: this server has no such piece and
    the page says so. ``audit``: the audit log the governance pieces write to (what
    ``server.alerts_api`` reads); ``ca``: the CA folder; ``home``: ``$MODELSEAL_HOME``;
    ``target``: the governance database (``governance.store.open_target``)."""

    home: Path
    registry: Any = None  # registry.service.Registry
    store: Any = None  # governance.store.GovStore
    policies: Any = None  # governance.versions.PolicyStore
    svc: Any = None  # keys.service.KeyService
    catalog: Any = None  # governance.brokerkeys.BrokerKeys
    audit: Any = None  # the audit log (audit.log / its sink)
    ca: Path | None = None
    issuer: Any = None  # pki.backend.Issuer
    target: str = ""


CONSOLE: web.AppKey[ConsoleDeps] = web.AppKey("console_deps", ConsoleDeps)
SESSION: web.RequestKey[Session] = web.RequestKey("console_session", Session)
POOL: web.AppKey[ThreadPoolExecutor] = web.AppKey("console_pool", ThreadPoolExecutor)

# The navigation, in order: (path, label). Pages register here (``nav``) at import.
NAV: list[tuple[str, str]] = []


class FormRefused(web.HTTPForbidden):
    """A POST whose CSRF token is missing or wrong (403, one line)."""

    def __init__(self, reason: str = "the form's CSRF token is missing or wrong: reload the page") -> None:
        super().__init__(text=reason)
        self.reason_line = reason


def cut(value: object, n: int = 200) -> str:
    """One printable line of at most ``n`` characters: what a page shows of untrusted text
    (registry names, certificate fields, audit entries, policy text); the template escapes it."""
    return printable(str(value))[:n]


def utc(t: object) -> str:
    """POSIX seconds as ``YYYY-MM-DD HH:MM`` UTC; "" for none or an unrepresentable time."""
    if isinstance(t, int | float) and not isinstance(t, bool) and 0 < t < 1e11:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")
    return ""


def nav(path: str, label: str) -> None:
    if (path, label) not in NAV:
        NAV.append((path, label))


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def deps(request: web.Request) -> ConsoleDeps:
    return request.app[CONSOLE]


def session(request: web.Request) -> Session:
    return request[SESSION]  # the console middleware refused otherwise


async def run(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the console's thread pool (database and file reads)."""
    return await asyncio.get_running_loop().run_in_executor(request.app[POOL], fn, *args)


def resource(request: web.Request, type_: str, id_: str, **attrs: object) -> Resource:
    """A resource of the caller's environment (``attrs`` may name another ``env``)."""
    return Resource(type_, id_, {"env": request[IDENTITY].env, **attrs})


async def require(
    request: web.Request, action: str, res: Resource, context: Mapping[str, object] | None = None
) -> Decision:
    """The allowing decision of ``action`` on ``res`` for the session's identity, or the
    decider's ``Refusal`` (403/429/503), which the console shows as a one-line page."""
    return await authz.authorize(request, action, res, context)


VIEW_OPERATION = "console-view"  # the audit event of a page's allowed() (authz.Authz.decide)


async def allowed(request: web.Request, action: str, res: Resource, *, step_up: bool = False) -> bool:
    """Whether the session's identity may ``action`` ``res``: the same Cedar decision, for
    showing or hiding a part of a page. It is audited as ``console-view``, not
    ``authorize``: a hidden button is not an attempt, so it counts neither towards the
    identity's denial limit nor for the anomaly detectors (a page asks many). ``step_up``:
    as if the POST brought a fresh TOTP code (the form asks for one; the POST is decided
    again, with the code checked). No decision: not allowed (fail closed)."""
    az = request.app.get(authz.AUTHZ)
    if az is None:
        return False
    ctx: dict[str, object] = {"tls_version": authz.tls_version(request)}
    if step_up:
        ctx.update(mfa=True, mfa_age=0)
    src = authz.request_source(request)
    try:
        d = await run(request, partial(az.decide, operation=VIEW_OPERATION), request[IDENTITY], action, res, ctx, src)
    except Exception:
        return False
    return d.allowed


async def post_fields(request: web.Request) -> dict[str, str]:
    """The text fields of a POSTed form (the first value of each), bounded (``MAX_FORM``),
    urlencoded only; a body that does not parse is a one-line 400, never a 500."""
    if request.content_length is not None and request.content_length > MAX_FORM:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_FORM, actual_size=request.content_length)
    if request.content_type != "application/x-www-form-urlencoded":
        raise web.HTTPBadRequest(text="a console form is posted as application/x-www-form-urlencoded")
    try:
        data = await request.post()
    except (ValueError, LookupError):  # a bad charset, bad UTF-8, a malformed body
        raise web.HTTPBadRequest(text="the form's body does not parse") from None
    out: dict[str, str] = {}
    for k, v in data.items():
        if isinstance(v, str) and k not in out:
            out[k] = v
    return out


async def form(request: web.Request) -> dict[str, str]:
    """The fields of a POSTed form, once its ``csrf`` field matched the session's token
    (constant-time); ``FormRefused`` otherwise. Only the first value of each field."""
    data = await post_fields(request)
    fields = dict(data)
    token = fields.get("csrf", "")
    expected = session(request).csrf
    if not token or not hmac.compare_digest(token.encode(), expected.encode()):
        raise FormRefused()
    return fields


def render(request: web.Request, template: str, *, title: str, status: int = 200, **values: Any) -> web.Response:
    """``template`` (under ``console_templates/``, extending ``layout.html``) with the
    session's identity, its CSRF token (``csrf``), the navigation and ``values``."""
    s = request.get(SESSION)
    page = _ENV.get_template(template).render(
        title=title,
        identity=None if s is None else s.identity,
        csrf="" if s is None else s.csrf,
        expires=None if s is None else s.expires,
        nav=NAV,
        here=request.path,
        **values,
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


__all__ = [
    "CONSOLE",
    "MAX_FORM",
    "NAV",
    "POOL",
    "PREFIX",
    "SESSION",
    "TEMPLATES",
    "VIEW_OPERATION",
    "ConsoleDeps",
    "FormRefused",
    "Session",
    "allowed",
    "cut",
    "deps",
    "form",
    "nav",
    "post_fields",
    "render",
    "require",
    "resource",
    "run",
    "session",
    "utc",
]
