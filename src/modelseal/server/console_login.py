"""The web console's sign-in, sign-out and session check (docs/console.md).

``POST /modelseal/v1/console/login`` (``api_login``): a caller authenticated by its client
certificate, allowed ``console.login`` on ``Governance:console``, gets a one-time link
``https://HOST/ui/login?t=TOKEN`` (``server.console_sessions``: 60 s, single use, bound to
that identity and certificate serial). ``GET /ui/login`` shows whom the link signs in as and
consumes nothing (a link preview or scanner cannot burn it); ``POST /ui/login`` consumes it
and sets the session cookie ``__Host-modelseal-console`` (``Secure``, ``HttpOnly``,
``SameSite=Strict``, path ``/``), then redirects to ``/ui/`` so the token leaves the address
bar. A browser that presented its own client certificate may instead ``POST
/ui/login/certificate``. ``POST /ui/logout`` ends the session server-side.

``session_of`` is the per-request check of the console middleware (``server.console``):
the cookie's live session, which ends when its certificate is revoked, its identity is of
another trust domain or environment than this server's, or the connection presents
another certificate than the one that opened it. Every sign-in, sign-out and ended session
is an audit event on ``Governance:console``.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from aiohttp import web

from modelseal.audit.events import AuditEvent
from modelseal.errors import ConsoleError, ModelsealError
from modelseal.governance.model import Resource
from modelseal.pki import denylist
from modelseal.pki.identity import Identity, parse
from modelseal.server import authz, console_page
from modelseal.server.console_page import PREFIX, Session
from modelseal.server.console_sessions import LINK_TTL, ConsoleSessions, ConsoleSettings
from modelseal.server.identity import IDENTITY, Authorizer, PeerLeaf, request_peer

COOKIE = "__Host-modelseal-console"
API_LOGIN = "/modelseal/v1/console/login"
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


@dataclass
class ConsoleState:
    """One application's console: its settings, sessions, the server's identity check and
    the vendored files (name: bytes, content type)."""

    settings: ConsoleSettings
    sessions: ConsoleSessions
    auth: Authorizer
    files: dict[str, tuple[bytes, str]]


STATE: web.AppKey[ConsoleState] = web.AppKey("console_state", ConsoleState)


def is_console(path: str) -> bool:
    """Whether ``path`` is the console's (``/ui`` or under it)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_page(request: web.Request, status: int, reason: str) -> web.Response:
    """The one-line HTML refusal (``console_templates/error.html``)."""
    line = " ".join(reason.split())[:300] or "refused"
    return console_page.render(request, "error.html", title=_TITLES.get(status, "Refused"), status=status, reason=line)


_TITLES = {401: "Signed out", 403: "Not allowed", 404: "Not found", 409: "Conflict", 429: "Too many requests"}


def _audit(request: web.Request, operation: str, actor: str, result: str = "ok") -> None:
    decider = request.app.get(authz.AUTHZ)
    if decider is not None:
        ev = AuditEvent(operation, "Governance:console", result, actor=actor, source=authz.request_source(request))
        decider.sink.emit(ev)


def _now(request: web.Request) -> float:
    return request.app[STATE].settings.clock()


def origin_ok(request: web.Request) -> bool:
    """A POST's ``Origin`` is this server's. Browsers send it on every form post (the
    console's ``Referrer-Policy`` keeps it from being ``null``); a post without one is
    refused, so sign-in, which has no CSRF token yet, cannot be forged (login CSRF)."""
    return hmac.compare_digest(request.headers.get("Origin", ""), f"https://{request.host}")


def see_other(location: str) -> web.Response:
    """A 303 to ``location`` (a path of this console), answered rather than raised."""
    return web.Response(status=303, headers={"Location": location}, text="303: See Other")


def _set_cookie(resp: web.StreamResponse, secret: str, max_age: float) -> None:
    resp.set_cookie(
        COOKIE, secret, path="/", secure=True, httponly=True, samesite="Strict", max_age=max(0, int(max_age))
    )


def _standing(state: ConsoleState, s: Session) -> str:
    """Why session ``s`` may not go on here ("": it may): its identity is of another trust
    domain or environment than this server's (``wrong-environment``), its certificate is on
    the CA's denylist (``revoked``), or it does not parse (``invalid``)."""
    try:
        ident = parse(s.identity)
        if ident.trust_domain != state.auth.trust_domain or ident.env != state.auth.env:
            return "wrong-environment"
        if state.auth.revoked.current().revoked(int(s.serial, 16)):
            return "revoked"
    except (ValueError, ModelsealError):
        return "invalid"
    return ""


async def session_of(request: web.Request, peer: PeerLeaf | None) -> Session | None:
    """The request's live session, or None; a session whose certificate was revoked, whose
    identity this server no longer serves or that another certificate carries ends here."""
    state = request.app[STATE]
    secret = request.cookies.get(COOKIE)
    if not secret or len(secret) > 200:
        return None
    s, ended = await console_page.run(request, state.sessions.lookup, secret, _now(request))
    if s is None:
        if ended:
            _audit(request, "console-session-expired", "unknown", "expired")
        return None
    why = _standing(state, s)
    other = peer is not None and denylist.serial_hex(peer.serial) != s.serial
    if not why and (other or (s.via == "certificate" and peer is None)):
        why = "other-certificate"
    if why:
        if why == "revoked":
            await console_page.run(request, state.sessions.end_serial, s.serial)
        else:
            await console_page.run(request, state.sessions.end, s.id)
        _audit(request, "console-session-expired", s.identity, why)
        return None
    return s


def _peer_identity(request: web.Request) -> tuple[Identity, PeerLeaf] | None:
    """The connection's verified certificate, when it has one (``server.identity`` checked it)."""
    peer = request_peer(request)
    ident = request.get(IDENTITY)
    return None if peer is None or ident is None else (ident, peer)


def _console_resource(request: web.Request) -> Resource:
    return Resource("Governance", "console", {"env": request[IDENTITY].env})


async def api_login(request: web.Request) -> web.Response:
    """``POST /modelseal/v1/console/login``: a one-time sign-in link for the caller."""
    await authz.authorize(request, "console.login", _console_resource(request))
    got = _peer_identity(request)
    host = request.host
    if got is None or not _HOST.fullmatch(host):
        return web.json_response({"errors": [{"code": "DENIED", "message": "no usable Host"}]}, status=400)
    ident, peer = got
    now = _now(request)
    state = request.app[STATE]
    serial = denylist.serial_hex(peer.serial)
    try:
        token = await console_page.run(request, state.sessions.make_link, ident.uri, serial, peer.not_after, now)
    except ConsoleError as e:
        body = {"errors": [{"code": "TOOMANYREQUESTS", "message": str(e)}]}
        return web.json_response(body, status=429, headers={"Retry-After": str(int(LINK_TTL))})
    _audit(request, "console-login-link", ident.uri)
    url = f"https://{host}{PREFIX}/login?t={token}"
    return web.json_response({"url": url, "identity": ident.uri, "expires": now + 60.0})


async def login_page(request: web.Request) -> web.Response:
    """``GET /ui/login``: "Sign in as ..." for a link (not consumed here), else signed out."""
    token = request.query.get("t", "")
    if token:
        state = request.app[STATE]
        who = await console_page.run(request, state.sessions.link_identity, token[:100], _now(request))
        return console_page.render(request, "login.html", title="Sign in", token=token[:100], who=who, peer=None)
    got = _peer_identity(request)
    peer = None if got is None else got[0].uri
    return console_page.render(request, "login.html", title="Signed out", token="", who=None, peer=peer)


def _signed_in(request: web.Request, s: Session, secret: str) -> web.StreamResponse:
    _audit(request, "console-login", s.identity, f"ok:{s.via}")
    resp = see_other(f"{PREFIX}/")
    _set_cookie(resp, secret, s.expires - _now(request))
    return resp


async def login_link(request: web.Request) -> web.StreamResponse:
    """``POST /ui/login``: consume the link of the form and open its session."""
    data = await console_page.post_fields(request)
    token = data.get("t")
    if not isinstance(token, str) or not token or len(token) > 100:
        return error_page(request, 400, "the sign-in form carries no link")
    state = request.app[STATE]
    now = _now(request)
    got = _peer_identity(request)
    if got is not None:
        who = await console_page.run(request, state.sessions.link_identity, token, now)
        if who != got[0].uri:
            return error_page(request, 403, f"this link signs in as {who}, not as this browser's {got[0].uri}")
    s, secret = await console_page.run(request, state.sessions.redeem, token, now)
    if _standing(state, s):  # revoked, or of another environment, since the link was made
        await console_page.run(request, state.sessions.end, s.id)
        return error_page(request, 403, "this identity's certificate cannot sign in here any more")
    return _signed_in(request, s, secret)


async def login_certificate(request: web.Request) -> web.StreamResponse:
    """``POST /ui/login/certificate``: a session for the browser's own client certificate."""
    got = _peer_identity(request)
    if got is None:
        return error_page(request, 401, "this browser presented no client certificate")
    ident, peer = got
    await authz.authorize(request, "console.login", _console_resource(request))
    state = request.app[STATE]
    serial = denylist.serial_hex(peer.serial)
    s, secret = await console_page.run(
        request, state.sessions.open_session, ident.uri, serial, peer.not_after, "certificate", _now(request)
    )
    return _signed_in(request, s, secret)


async def logout(request: web.Request) -> web.StreamResponse:
    """``POST /ui/logout``: end the session server-side and clear its cookie."""
    await console_page.form(request)
    s = console_page.session(request)
    await console_page.run(request, request.app[STATE].sessions.end, s.id)
    _audit(request, "console-logout", s.identity)
    resp = see_other(f"{PREFIX}/login")
    resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return resp


__all__ = [
    "API_LOGIN",
    "COOKIE",
    "STATE",
    "ConsoleState",
    "api_login",
    "error_page",
    "is_console",
    "login_certificate",
    "login_link",
    "login_page",
    "logout",
    "origin_ok",
    "see_other",
    "session_of",
]
