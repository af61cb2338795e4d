"""``/modelseal/v1/access``, ``/approvals`` and ``/mfa``: bindings, grants, break-glass,
two-person approvals, step-up MFA and the access review (docs/access.md).

Every route is decided once by ``server.authz`` (Cedar). Step-up MFA and the two-person
rule are ``server.gov_decide``'s (shared with the web console): a two-person action is
queued (``queue_approval``, 202) and runs once approved (``decide_approval``, the route
``approvals/ID/approve|deny``). A ``security-officer`` binding, grant or removal waits for
approval too (``approvals.APPROVABLE``); nobody binds a pattern matching their own identity
(``store.check_not_self``). Changes are audited with the caller as actor
(``approval-request``, ``approval-run``, ``access-bind``, ...); the decisions themselves are
audited by ``server.authz``. ``add_routes`` hands ``[governance] two_person`` to the decider
(``Authz.two_person``), so Cedar's ``gov-two-person-configured`` sees it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from modelseal.errors import AccessDenied, GovernanceError, IdentityError, ModelsealError
from modelseal.governance import model, review
from modelseal.governance.approvals import Approvals, Conflict, Settings
from modelseal.governance.approvals import settings as gov_settings
from modelseal.governance.mfa import Mfa
from modelseal.governance.model import Binding, Resource
from modelseal.governance.store import OFFICER, GovStore, binding_json
from modelseal.keys.service import KeyService
from modelseal.server import authz
from modelseal.server import gov_decide as gd
from modelseal.server import jsonbody as jb
from modelseal.server.gov_decide import (  # re-exported: the names the other routes and tests use
    APPROVALS,
    MFA,
    POOL,
    REVIEWS,
    SETTINGS,
    SOURCE,
    STORE,
    Executor,
    NotFound,
    queue_approval,
    register_executor,
    step_up,
)
from modelseal.server.identity import IDENTITY, peer_der

log = logging.getLogger("modelseal.server")

PREFIX = "/modelseal/v1"
_run, _audit = gd.run, gd.audit


def _answer(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": " ".join(message.split())[:300]}]}, status=status)


def _gov(request: web.Request, rid: str, **attrs: object) -> Resource:
    return Resource("Governance", rid, {"env": request[IDENTITY].env, **attrs})


# -- parsing -------------------------------------------------------------------------------
def _seconds(doc: Mapping[str, Any], name: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= model.MAX_BINDING:
        raise GovernanceError(f"{name} must be a whole number of seconds")
    return value


def _guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """Typed errors as one-line JSON answers; ``web.HTTPException`` (authz's) passes."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except NotFound as e:
            return _answer(404, "NOT_FOUND", str(e))
        except AccessDenied as e:  # nobody grants themselves access (governance.store)
            return _answer(403, "DENIED", str(e))
        except (GovernanceError, IdentityError) as e:
            return _answer(409 if isinstance(e, Conflict) else 400, "INVALID", str(e))
        except ModelsealError as e:
            log.error("%s %s by %s failed: %s", request.method, request.path[:120], request[IDENTITY].uri, e)
            return _answer(503, "UNAVAILABLE", "the governance state is unavailable; retry later")

    return run


# -- access ----------------------------------------------------------------------------------
async def list_bindings(request: web.Request) -> web.Response:
    await authz.authorize(request, "access.list", _gov(request, "bindings"))
    rows = await _run(request.app, request.app[STORE].bindings, request.query.get("all") == "1")
    return web.json_response({"bindings": [binding_json(b) for b in rows]})


def _wanted(request: web.Request, doc: Mapping[str, Any], kind: str, who: str | None = None) -> dict[str, Any]:
    """The parameters of a binding, grant or break-glass window asked for in ``doc``."""
    ident = request[IDENTITY]
    params: dict[str, Any] = {"identity": who or jb.string(doc, "identity"), "role": jb.string(doc, "role", limit=64)}
    params |= {
        "env": jb.string(doc, "env", 64, ident.env),
        "reason": jb.string(doc, "reason", default=""),
        "for": _seconds(doc, "for"),
    }
    params["kind"] = kind
    return params


def _binding_of(p: Mapping[str, Any], now: float) -> Binding:
    return Binding("", p["identity"], p["role"], p["env"], now + p["for"], p["kind"], p["reason"])


async def _bind(request: web.Request, kind: str) -> web.Response:
    doc = await jb.read_object(request)
    action = "access.bind" if kind == "binding" else "access.grant"
    params = _wanted(request, doc, kind)
    ctx = await step_up(request, action, params["identity"], params, jb.otp(doc))
    res = Resource("Governance", "bindings", {"env": params["env"], "role": params["role"]})
    if params["role"] == OFFICER:  # the officer pool changes only with a second officer
        await _run(request.app, request.app[STORE].check, _binding_of(params, time.time()), None, request[IDENTITY].uri)
        return await queue_approval(request, action, res, params, ctx)
    await authz.authorize(request, action, res, ctx)
    now, by = time.time(), request[IDENTITY].uri
    b = await _run(request.app, request.app[STORE].bind, _binding_of(params, now), by, now)
    _audit(request, action.replace(".", "-"), f"binding:{b.id}", f"ok:{b.role}@{b.env}")
    log.info("%s %s: %s is %s in %s until %d, by %s", kind, b.id, b.pattern, b.role, b.env, b.expires, by)
    return web.json_response(binding_json(b), status=201)


async def unbind(request: web.Request) -> web.Response:
    bid = request.match_info["id"]
    doc = await jb.read_object(request)
    ctx = await step_up(request, "access.unbind", bid, {"id": bid}, jb.otp(doc))
    b = await _run(request.app, request.app[STORE].get, bid)
    if b is None:
        await authz.authorize(request, "access.unbind", _gov(request, "bindings"), ctx)
        raise NotFound(f"no binding {bid[:40]!r}")
    res = Resource("Governance", b.id, {"env": b.env, "role": b.role})
    if b.role == OFFICER:
        return await queue_approval(request, "access.unbind", res, {"id": bid}, ctx)
    await authz.authorize(request, "access.unbind", res, ctx)
    gone = await _run(request.app, request.app[STORE].unbind, bid, request[IDENTITY].uri)
    _audit(request, "access-unbind", f"binding:{gone.id}", f"ok:{gone.role}@{gone.env}")
    return web.json_response(binding_json(gone))


async def break_glass(request: web.Request) -> web.Response:
    """Ask for a break-glass window for oneself: an approval request (202)."""
    doc = await jb.read_object(request)
    params = _wanted(request, doc, "break-glass", who=request[IDENTITY].uri)
    limit = request.app[SETTINGS].break_glass_for
    if params["for"] > limit:
        raise GovernanceError(f"a break-glass window is at most {int(limit // 60)} minutes on this server")
    await _run(request.app, request.app[STORE].check, _binding_of(params, time.time()))  # now, not once approved
    ctx = await step_up(request, "access.break-glass", params["identity"], params, jb.otp(doc))
    res = Resource("Governance", "break-glass", {"env": params["env"], "role": params["role"]})
    return await queue_approval(request, "access.break-glass", res, params, ctx)


async def execute_bind(app: web.Application, params: dict[str, Any], requester: str) -> dict[str, Any]:
    """Run an approved break-glass window (the requester's) or officer binding, from now."""
    now, glass = time.time(), params["kind"] == "break-glass"
    wanted = _binding_of({**params, "identity": requester} if glass else params, now)
    b = await _run(app, app[STORE].bind, wanted, requester, now)  # never the requester's own (store)
    what = "BREAK-GLASS window" if glass else f"approved {b.kind}"
    log.warning("%s %s: %s is %s in %s until %d", what, b.id, b.pattern, b.role, b.env, b.expires)
    return {"binding": b.id, "role": b.role, "env": b.env, "expires": b.expires}


async def execute_unbind(app: web.Application, params: dict[str, Any], requester: str) -> dict[str, Any]:
    """The executor of an approved removal of a security-officer binding."""
    gone = await _run(app, app[STORE].unbind, str(params["id"]), requester)
    return {"removed": gone.id, "identity": gone.pattern, "role": gone.role, "env": gone.env}


# -- approvals -------------------------------------------------------------------------------
async def list_approvals(request: web.Request) -> web.Response:
    await authz.authorize(request, "approval.list", _gov(request, "approvals"))
    store = request.app[APPROVALS]
    rows = await _run(request.app, store.recent if request.query.get("all") == "1" else store.pending)
    mine = [a.to_json(time.time()) for a in rows if a.resource.attrs.get("env") == request[IDENTITY].env]
    return web.json_response({"approvals": mine})


async def decide(request: web.Request) -> web.Response:
    """Approve or deny (``.../approve``, ``.../deny``) with a fresh code bound to the request."""
    doc = await jb.read_object(request)
    verdict, reason = request.match_info["verdict"], jb.string(doc, "reason", default="")
    a = await gd.decide_approval(request, request.match_info["id"], verdict, jb.otp(doc), reason)
    return web.json_response(a.to_json(time.time()))


# -- MFA and the access review -----------------------------------------------------------------
async def mfa_enroll(request: web.Request) -> web.Response:
    await authz.authorize(request, "mfa.enroll", _gov(request, "mfa"))
    uri = await _run(request.app, request.app[MFA].enroll, request[IDENTITY].uri)
    _audit(request, "mfa-enroll", "mfa:totp", "ok:pending")
    return web.json_response({"uri": uri, "state": "pending"}, headers={"Cache-Control": "no-store"})


async def mfa_confirm(request: web.Request) -> web.Response:
    doc = await jb.read_object(request)
    await authz.authorize(request, "mfa.enroll", _gov(request, "mfa"))
    await _run(request.app, request.app[MFA].confirm, request[IDENTITY].uri, jb.otp(doc) or "")
    _audit(request, "mfa-confirm", "mfa:totp", "ok:active")
    return web.json_response({"state": "active"})


async def produce_review(request: web.Request) -> dict[str, Any]:
    """A fresh access review (``review.build``), kept so that it can be attested (the caller
    decided ``access.review``; the console's Access review page shows the same)."""
    rows = await _run(request.app, request.app[STORE].bindings, True)
    index = request.app[authz.AUTHZ].holds  # identities suspended by a hold are flagged (governance.holds)
    held = None if index is None else await _run(request.app, index.stored)  # this environment's
    rv = review.build(rows, holds=held)
    await _run(request.app, request.app[REVIEWS].keep, rv, request[IDENTITY].uri)
    return rv


async def access_review(request: web.Request) -> web.Response:
    await authz.authorize(request, "access.review", _gov(request, "review"))
    return web.json_response(await produce_review(request))


async def attest(request: web.Request) -> web.Response:
    doc = await jb.read_object(request)
    await authz.authorize(request, "access.attest", _gov(request, "review"))
    der = peer_der(request)
    if der is None:
        return _answer(401, "UNAUTHORIZED", "a client certificate is required")
    digest, sig, who = jb.string(doc, "digest", limit=80), jb.string(doc, "signature", limit=200), request[IDENTITY].uri
    a = await _run(request.app, request.app[REVIEWS].attest, digest, who, sig, der)
    _audit(request, "access-attest", f"review:{digest}", f"ok:{a.id}")
    return web.json_response(a.to_json(), status=201)


def add_routes(
    app: web.Application, store: GovStore, svc: KeyService | None = None, settings: Settings | None = None
) -> None:
    """Mount the governance routes on ``app`` (behind the identity middleware and ``authz``);
    the MFA, approval and review tables open on ``store``'s database; ``svc`` seals the MFA
    secrets (default: this process's ``KeyService``), ``settings`` default to ``[governance]``."""
    cfg = settings or gov_settings()
    if cfg.two_person:  # Cedar sees them through the decider: without one they could not be enforced
        if authz.AUTHZ not in app:
            raise GovernanceError("config: governance.two_person needs the decider installed first")
        app[authz.AUTHZ].two_person |= frozenset(cfg.two_person)
    app[STORE], app[SETTINGS] = store, cfg
    app[MFA] = Mfa.open(store.target, svc or KeyService(), cfg.key)
    app[APPROVALS] = Approvals.open(store.target)
    app[REVIEWS] = review.Reviews.open(store.target)
    app[POOL] = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gov")

    async def stop(app: web.Application) -> None:
        app[POOL].shutdown(wait=False, cancel_futures=True)
        for db in (app[MFA], app[APPROVALS], app[REVIEWS]):
            db.close()

    app.on_cleanup.append(stop)
    r, p = app.router, PREFIX
    r.add_get(f"{p}/access/bindings", _guarded(list_bindings))
    r.add_post(f"{p}/access/bindings", _guarded(functools.partial(_bind, kind="binding")))
    r.add_delete(p + "/access/bindings/{id}", _guarded(unbind))
    r.add_post(f"{p}/access/grants", _guarded(functools.partial(_bind, kind="grant")))
    r.add_post(f"{p}/access/break-glass", _guarded(break_glass))
    r.add_get(f"{p}/access/review", _guarded(access_review))
    r.add_post(f"{p}/access/attestations", _guarded(attest))
    r.add_get(f"{p}/approvals", _guarded(list_approvals))
    r.add_post(p + "/approvals/{id}/{verdict:approve|deny}", _guarded(decide))
    r.add_post(f"{p}/mfa/enroll", _guarded(mfa_enroll))
    r.add_post(f"{p}/mfa/confirm", _guarded(mfa_confirm))
    for action in ("access.break-glass", "access.bind", "access.grant"):
        register_executor(action, execute_bind)
    register_executor("access.unbind", execute_unbind)


__all__ = ["APPROVALS", "MFA", "POOL", "PREFIX", "REVIEWS", "SETTINGS", "SOURCE", "STORE", "Executor", "NotFound"]
__all__ += ["add_routes", "produce_review", "queue_approval", "register_executor", "step_up"]
