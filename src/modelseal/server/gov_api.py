"""``/modelseal/v1/access``, ``/approvals`` and ``/mfa``: bindings, grants, break-glass,
two-person approvals, step-up MFA and the access review (docs/access.md).

Every route is decided once by ``server.authz`` (Cedar). Step-up MFA: the TOTP code comes in
the JSON body (``"otp"``) of the request it authorizes and is verified bound to that
request's digest (``step_up``; ``governance.mfa``); the result is context for the decision,
never a decision of its own; a code presented again is audited (``mfa-replay``, ``server.refusals``).
A two-person action (``model.TWO_PERSON``) is not run when asked
for: ``queue_approval`` decides it as it stands (allowed, or denied by the two-person forbid
alone) and records an approval request (202); officers approve it, each with a fresh code
bound to the request's digest, and the approval that completes it runs the action's
registered executor exactly once (``register_executor``), after deciding it again for the
requester with ``approved`` set, from the source it asked from (recorded in the params,
``SOURCE``): a requester who lost the role or is held meanwhile is refused then. A
``security-officer`` binding, grant or removal waits for approval too (``approvals.APPROVABLE``);
nobody binds a pattern matching their own identity (``store.check_not_self``). Changes are
audited with the caller as actor (``approval-request``, ``approval-run``, ``access-bind``, ...);
the decisions themselves are audited by ``server.authz``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from modelseal.audit.events import AuditEvent
from modelseal.errors import AccessDenied, GovernanceError, IdentityError, ModelsealError
from modelseal.governance import cedar, model, review
from modelseal.governance.approvals import APPROVABLE, Approval, Approvals, Conflict, Settings, check_id
from modelseal.governance.approvals import settings as gov_settings
from modelseal.governance.mfa import Mfa, request_digest
from modelseal.governance.model import Binding, Decision, Resource
from modelseal.governance.store import OFFICER, GovStore, binding_json
from modelseal.keys.service import KeyService
from modelseal.pki.identity import Identity, parse
from modelseal.server import authz, refusals
from modelseal.server import jsonbody as jb
from modelseal.server.identity import IDENTITY, peer_der

log = logging.getLogger("modelseal.server")
T = TypeVar("T")

PREFIX = "/modelseal/v1"
Executor = Callable[[web.Application, dict[str, Any], str], Awaitable[dict[str, Any]]]
_EXECUTORS: dict[str, Executor] = {}
Ctx = Mapping[str, object]
SOURCE = "requester_source"  # an approval's params: where the requester asked from (holds are re-checked on it)

STORE: web.AppKey[GovStore] = web.AppKey("gov_store", GovStore)
MFA: web.AppKey[Mfa] = web.AppKey("gov_mfa", Mfa)
APPROVALS: web.AppKey[Approvals] = web.AppKey("gov_approvals", Approvals)
REVIEWS: web.AppKey[review.Reviews] = web.AppKey("gov_reviews", review.Reviews)
SETTINGS: web.AppKey[Settings] = web.AppKey("gov_settings", Settings)
POOL: web.AppKey[ThreadPoolExecutor] = web.AppKey("gov_pool", ThreadPoolExecutor)
STEP_UP: web.RequestKey[dict[str, object]] = web.RequestKey("gov_step_up", dict)


class NotFound(GovernanceError):
    """No such binding or approval (404)."""


def register_executor(action: str, fn: Executor) -> None:
    """Run ``fn(app, params, requester)`` when a request of ``action`` is approved."""
    if action not in APPROVABLE:
        raise ValueError(f"{action!r} is not an action that waits for approval")
    _EXECUTORS[action] = fn


def _answer(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": " ".join(message.split())[:300]}]}, status=status)


async def _run(app: web.Application, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(app[POOL], fn, *args)


def _audit(request: web.Request, op: str, key: str, result: str, actor: str | None = None) -> None:
    ev = AuditEvent(op, key, result, actor=actor or request[IDENTITY].uri, source=authz.request_source(request))
    request.app[authz.AUTHZ].sink.emit(ev)


def _gov(request: web.Request, rid: str, **attrs: object) -> Resource:
    return Resource("Governance", rid, {"env": request[IDENTITY].env, **attrs})


# -- step-up MFA and the two-person rule ---------------------------------------------------
async def step_up(
    request: web.Request, action: str, resource_id: str, params: Mapping[str, Any], otp: str | None
) -> dict[str, object]:
    """The MFA facts of this request for its decision: ``mfa`` (a valid code of the caller,
    bound to ``request_digest(action, resource_id, params)``, used up now), ``mfa_age`` and,
    when a code was given and refused, ``mfa_error`` (one line)."""
    ctx: dict[str, object] = {"mfa": False, "mfa_age": -1}
    if otp is not None:
        try:
            digest = request_digest(action, resource_id, params)
            age = await _run(request.app, request.app[MFA].verify, request[IDENTITY].uri, otp, digest)
            ctx = {"mfa": True, "mfa_age": age}
        except GovernanceError as e:
            ctx["mfa_error"] = str(e)
            refusals.mfa_refused(request, action, e)  # a replayed code is audited (mfa-replay)
        except ModelsealError as e:  # the KEK of the secrets, the database
            log.error("MFA of %s cannot be checked: %s", request[IDENTITY].uri, e)
            ctx["mfa_error"] = "MFA cannot be checked now; retry later"
    request[STEP_UP] = ctx
    return dict(ctx)


async def _decide(
    request: web.Request, who: Identity, action: str, res: Resource, ctx: Ctx, limit: bool = True, *, src: str | None
) -> Decision:
    az = request.app.get(authz.AUTHZ)
    if az is None:
        raise authz.Refusal(503, "UNAVAILABLE", "this server has no authorization configured")
    wait = az.limiter.retry_after(who.uri, time.monotonic()) if limit else 0
    if wait:
        raise authz.Refusal(429, "TOOMANYREQUESTS", f"too many denied requests: retry after {wait} s")
    ctx = {"tls_version": authz.tls_version(request), **ctx}
    try:
        return await _run(request.app, az.decide, who, action, res, ctx, src)  # src: a hold on it denies
    except ModelsealError as e:
        log.error("no decision for %s on %s: %s", who.uri, authz.resource_key(action, res), e)
        raise authz.Refusal(503, "UNAVAILABLE", "authorization is unavailable; retry later") from None


async def queue_approval(
    request: web.Request, action: str, resource: Resource, params: Mapping[str, Any], context: Ctx | None = None
) -> web.Response:
    """Decide ``action`` as asked (the step-up context of this request: ``context``, or
    what ``step_up`` found) and, when only the two-person rule stands in its way, record an
    approval request: 202 ``{"approval", "digest", "needs", "expires"}``. Any other denial
    is a 403, as ``authz.authorize`` answers. The handler must not run the action itself."""
    ident = request[IDENTITY]
    if action not in _EXECUTORS:
        return _answer(501, "UNSUPPORTED", f"{action} cannot be approved on this server (no executor)")
    ctx = dict(context if context is not None else request.get(STEP_UP) or {})
    ctx |= {"approved": False, "approvals": 0}
    src = authz.request_source(request)
    d = await _decide(request, ident, action, resource, ctx, src=src)
    if not d.allowed and set(d.policies) != {cedar.TWO_PERSON_ID}:
        request.app[authz.AUTHZ].limiter.denied(ident.uri, time.monotonic())
        raise authz.Refusal(403, "DENIED", d.reason or f"{action} is not allowed")
    s, params = request.app[SETTINGS], {**params, SOURCE: src}
    a = await _run(
        request.app, request.app[APPROVALS].request, action, resource, params, ident.uri, s.approvals, s.approval_ttl
    )
    _audit(request, "approval-request", authz.resource_key(action, resource), f"queued:{a.id}")
    body = {"approval": a.id, "digest": a.digest, "needs": a.needs, "expires": a.expires, "action": action}
    return web.json_response(body, status=202)


async def _execute(request: web.Request, a: Approval) -> Approval:
    """Run the claimed approval ``a`` (exactly once: only its claimer gets here)."""
    key = authz.resource_key(a.action, a.resource)
    try:
        fn = _EXECUTORS.get(a.action)
        if fn is None:
            raise GovernanceError(f"{a.action} has no executor on this server")
        ctx: dict[str, object] = {"mfa": True, "mfa_age": int(max(0.0, time.time() - a.created))}
        ctx |= {"approved": True, "approvals": len(a.approvers)}
        src = a.params.get(SOURCE)  # where the requester asked from: held since, the run is refused
        d = await _decide(request, parse(a.requester), a.action, a.resource, ctx, False, src=str(src) if src else None)
        if not d.allowed:
            raise AccessDenied(f"the requester may no longer do this: {d.reason}")
        result = await fn(request.app, {k: v for k, v in a.params.items() if k != SOURCE}, a.requester)
        done = await _run(request.app, request.app[APPROVALS].finish, a.id, result, None)
    except Exception as e:  # the claim is finished whatever happened: never left to run again
        why = getattr(e, "reason_line", None) or (str(e) if isinstance(e, ModelsealError) else type(e).__name__)
        log.error("approved %s (%s) failed: %s", a.action, a.id, why)
        done = await _run(request.app, request.app[APPROVALS].finish, a.id, None, why)
    _audit(request, "approval-run", key, f"{done.state}:{a.id}", actor=a.requester)
    return done


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
async def _approval(request: web.Request, action: str) -> Approval:
    aid = request.match_info["id"]
    try:
        return await _run(request.app, request.app[APPROVALS].get, check_id(aid))
    except GovernanceError:  # a malformed id too: UnknownApproval
        await authz.authorize(request, action, Resource("Approval", aid[:40], {"env": request[IDENTITY].env}))
        raise NotFound(f"no approval request {aid[:40]!r}") from None


async def list_approvals(request: web.Request) -> web.Response:
    await authz.authorize(request, "approval.list", _gov(request, "approvals"))
    store = request.app[APPROVALS]
    rows = await _run(request.app, store.recent if request.query.get("all") == "1" else store.pending)
    mine = [a.to_json(time.time()) for a in rows if a.resource.attrs.get("env") == request[IDENTITY].env]
    return web.json_response({"approvals": mine})


async def decide(request: web.Request) -> web.Response:
    """Approve or deny (``.../approve``, ``.../deny``) with a fresh code bound to the request."""
    verdict = request.match_info["verdict"]
    doc = await jb.read_object(request)
    a = await _approval(request, "approval.decide")
    ident, store, reason = request[IDENTITY], request.app[APPROVALS], jb.string(doc, "reason", default="")
    params = {"decision": verdict, "digest": a.digest, **({"reason": reason} if verdict == "deny" else {})}
    ctx = await step_up(request, "approval.decide", a.id, params, jb.otp(doc))
    env = str(a.resource.attrs.get("env", ""))  # the request's environment, never the approver's
    res = Resource("Approval", a.id, {"env": env, "action": a.action, "requester": a.requester})
    await authz.authorize(request, "approval.decide", res, ctx)
    claimed = False
    if verdict == "deny":
        a = await _run(request.app, store.deny, a.id, ident.uri, reason)
    else:
        a, claimed = await _run(request.app, store.approve, a.id, ident.uri)
    shown = f"denied:{a.id}" if verdict == "deny" else f"ok:{len(a.approvers)}/{a.needs}:{a.id}"
    _audit(request, f"approval-{verdict}", authz.resource_key(a.action, a.resource), shown)
    if claimed:  # this approval completed the request: it runs here, once, whatever the client does
        a = await asyncio.shield(_execute(request, a))
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


async def access_review(request: web.Request) -> web.Response:
    await authz.authorize(request, "access.review", _gov(request, "review"))
    rows = await _run(request.app, request.app[STORE].bindings, True)
    index = request.app[authz.AUTHZ].holds  # identities suspended by a hold are flagged (governance.holds)
    held = None if index is None else await _run(request.app, index.stored)  # this environment's
    rv = review.build(rows, holds=held)
    await _run(request.app, request.app[REVIEWS].keep, rv, request[IDENTITY].uri)
    return web.json_response(rv)


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


__all__ = ["APPROVALS", "MFA", "PREFIX", "STORE", "Executor", "add_routes", "queue_approval"]
__all__ += ["register_executor", "step_up"]
