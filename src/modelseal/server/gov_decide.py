"""The two-person rule and step-up MFA of ``modelseal serve``, shared by every face that
asks for or decides an approval: the API (``server.gov_api``, ``server.keys_api``,
``server.holds_api``, ``server.policy_api``) and the web console (``server.console_approvals``).

Step-up MFA: the TOTP code comes with the request it authorizes and is verified bound to
that request's digest (``step_up``; ``governance.mfa``); the result is context for the
decision, never a decision of its own; a code presented again is audited (``mfa-replay``,
``server.refusals``). A two-person action (``model.TWO_PERSON``, and those
``[governance] two_person`` of config.toml adds, ``waits``) is not run when asked for:
``queue_approval`` decides it as it stands (allowed, or denied by the two-person forbids
alone: ``gov-two-person``, ``gov-two-person-configured``) and records an approval request
with the ids of the forbids that made it wait (``WAITS_ON`` in its params). Officers decide
it with ``decide_approval``, each with a fresh code bound to the request's digest; the
approval that completes it runs the action's registered executor exactly once
(``register_executor``), after deciding it again for the requester with ``approved`` set,
from the source it asked from (``SOURCE``): a requester who lost the role or is held
meanwhile is refused then. Changes are audited with the caller as actor
(``approval-request``, ``approval-approve``, ``approval-deny``, ``approval-run``); the
decisions themselves by ``server.authz``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from modelseal.audit.events import AuditEvent
from modelseal.errors import AccessDenied, GovernanceError, ModelsealError
from modelseal.governance import cedar, review
from modelseal.governance.approvals import APPROVABLE, Approval, Approvals, Settings, check_id
from modelseal.governance.mfa import Mfa, request_digest
from modelseal.governance.model import Decision, Resource
from modelseal.governance.store import GovStore
from modelseal.pki.identity import Identity, parse
from modelseal.server import authz, refusals
from modelseal.server.identity import IDENTITY

log = logging.getLogger("modelseal.server")
T = TypeVar("T")

Executor = Callable[[web.Application, dict[str, Any], str], Awaitable[dict[str, Any]]]
_EXECUTORS: dict[str, Executor] = {}
Ctx = Mapping[str, object]
SOURCE = "requester_source"  # an approval's params: where the requester asked from (holds are re-checked on it)
WAITS_ON = "waits_on"  # an approval's params: the forbids it waits on ([] when the server's own rule queued it)
META = (SOURCE, WAITS_ON)  # the params the server adds; an executor never sees them
WAITING = frozenset({cedar.TWO_PERSON_ID, authz.TWO_PERSON_CONFIGURED})
VERDICTS = ("approve", "deny")

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


def waits(app: web.Application, action: str) -> bool:
    """Whether ``[governance] two_person`` of this server makes ``action`` wait for approval."""
    s = app.get(SETTINGS)
    return s is not None and action in s.two_person


async def run(app: web.Application, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the governance pool."""
    return await asyncio.get_running_loop().run_in_executor(app[POOL], fn, *args)


def audit(request: web.Request, op: str, key: str, result: str, actor: str | None = None) -> None:
    """One governance change on the decider's audit sink, by the caller unless ``actor``."""
    ev = AuditEvent(op, key, result, actor=actor or request[IDENTITY].uri, source=authz.request_source(request))
    request.app[authz.AUTHZ].sink.emit(ev)


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
            age = await run(request.app, request.app[MFA].verify, request[IDENTITY].uri, otp, digest)
            ctx = {"mfa": True, "mfa_age": age}
        except GovernanceError as e:
            ctx["mfa_error"] = str(e)
            refusals.mfa_refused(request, action, e)  # a replayed code is audited (mfa-replay)
        except ModelsealError as e:  # the KEK of the secrets, the database
            log.error("MFA of %s cannot be checked: %s", request[IDENTITY].uri, e)
            ctx["mfa_error"] = "MFA cannot be checked now; retry later"
    request[STEP_UP] = ctx
    return dict(ctx)


async def decide_as(
    request: web.Request, who: Identity, action: str, res: Resource, ctx: Ctx, limit: bool = True, *, src: str | None
) -> Decision:
    """The decision (allowed or not) of ``action`` for ``who``, from source ``src``."""
    az = request.app.get(authz.AUTHZ)
    if az is None:
        raise authz.Refusal(503, "UNAVAILABLE", "this server has no authorization configured")
    wait = az.limiter.retry_after(who.uri, time.monotonic()) if limit else 0
    if wait:
        raise authz.Refusal(429, "TOOMANYREQUESTS", f"too many denied requests: retry after {wait} s")
    ctx = {"tls_version": authz.tls_version(request), **ctx}
    try:
        return await run(request.app, az.decide, who, action, res, ctx, src)  # src: a hold on it denies
    except ModelsealError as e:
        log.error("no decision for %s on %s: %s", who.uri, authz.resource_key(action, res), e)
        raise authz.Refusal(503, "UNAVAILABLE", "authorization is unavailable; retry later") from None


async def queue_approval(
    request: web.Request, action: str, resource: Resource, params: Mapping[str, Any], context: Ctx | None = None
) -> web.Response:
    """Decide ``action`` as asked (the step-up context of this request: ``context``, or
    what ``step_up`` found) and, when only the two-person forbids stand in its way, record
    an approval request: 202 ``{"approval", "digest", "needs", "expires", "action",
    "waits_on"}``. Any other denial is a 403, as ``authz.authorize`` answers. The handler
    must not run the action itself."""
    ident = request[IDENTITY]
    if action not in _EXECUTORS:
        why = f"{action} cannot be approved on this server (no executor)"
        return web.json_response({"errors": [{"code": "UNSUPPORTED", "message": why}]}, status=501)
    ctx = dict(context if context is not None else request.get(STEP_UP) or {})
    ctx |= {"approved": False, "approvals": 0}
    src = authz.request_source(request)
    d = await decide_as(request, ident, action, resource, ctx, src=src)
    if not d.allowed and not (d.policies and set(d.policies) <= WAITING):
        request.app[authz.AUTHZ].limiter.denied(ident.uri, time.monotonic())
        raise authz.Refusal(403, "DENIED", d.reason or f"{action} is not allowed")
    s, waits_on = request.app[SETTINGS], [] if d.allowed else sorted(d.policies)
    params = {**params, SOURCE: src, WAITS_ON: waits_on}
    a = await run(
        request.app, request.app[APPROVALS].request, action, resource, params, ident.uri, s.approvals, s.approval_ttl
    )
    audit(request, "approval-request", authz.resource_key(action, resource), f"queued:{a.id}")
    body = {"approval": a.id, "digest": a.digest, "needs": a.needs, "expires": a.expires, "action": action}
    return web.json_response(body | {"waits_on": waits_on}, status=202)


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
        who, where = parse(a.requester), str(src) if src else None
        d = await decide_as(request, who, a.action, a.resource, ctx, False, src=where)
        if not d.allowed:
            raise AccessDenied(f"the requester may no longer do this: {d.reason}")
        result = await fn(request.app, {k: v for k, v in a.params.items() if k not in META}, a.requester)
        done = await run(request.app, request.app[APPROVALS].finish, a.id, result, None)
    except Exception as e:  # the claim is finished whatever happened: never left to run again
        why = getattr(e, "reason_line", None) or (str(e) if isinstance(e, ModelsealError) else type(e).__name__)
        log.error("approved %s (%s) failed: %s", a.action, a.id, why)
        done = await run(request.app, request.app[APPROVALS].finish, a.id, None, why)
    audit(request, "approval-run", key, f"{done.state}:{a.id}", actor=a.requester)
    return done


async def find_approval(request: web.Request, approval_id: str) -> Approval:
    """The approval request ``approval_id``; ``NotFound`` (after a decision over the caller's
    environment, so an id is no probe) for a malformed or unknown one."""
    try:
        return await run(request.app, request.app[APPROVALS].get, check_id(approval_id))
    except GovernanceError:  # a malformed id too: UnknownApproval
        env = request[IDENTITY].env
        await authz.authorize(request, "approval.decide", Resource("Approval", approval_id[:40], {"env": env}))
        raise NotFound(f"no approval request {approval_id[:40]!r}") from None


def decided_on(a: Approval) -> Resource:
    """What ``approval.decide`` of ``a`` is asked on: the request in its own environment,
    never the approver's."""
    env = str(a.resource.attrs.get("env", ""))
    return Resource("Approval", a.id, {"env": env, "action": a.action, "requester": a.requester})


async def decide_approval(
    request: web.Request, approval_id: str, verdict: str, otp: str | None, reason: str = ""
) -> Approval:
    """Approve or deny (``verdict``) the request ``approval_id`` as the caller, with a fresh
    code ``otp`` bound to the request's digest and this verdict (and a deny's ``reason``):
    decided as ``approval.decide`` on the ``Approval`` in the request's environment, never
    the approver's. The approval that completes the request runs it here, once, whatever
    the client does meanwhile. Returns the request as it ends up (``done``/``failed`` once
    run, with the executor's result or error)."""
    if verdict not in VERDICTS:
        raise GovernanceError("a verdict is approve or deny")
    a = await find_approval(request, approval_id)
    ident, store = request[IDENTITY], request.app[APPROVALS]
    params = {"decision": verdict, "digest": a.digest, **({"reason": reason} if verdict == "deny" else {})}
    ctx = await step_up(request, "approval.decide", a.id, params, otp)
    await authz.authorize(request, "approval.decide", decided_on(a), ctx)
    claimed = False
    if verdict == "deny":
        a = await run(request.app, store.deny, a.id, ident.uri, reason)
    else:
        a, claimed = await run(request.app, store.approve, a.id, ident.uri)
    shown = f"denied:{a.id}" if verdict == "deny" else f"ok:{len(a.approvers)}/{a.needs}:{a.id}"
    audit(request, f"approval-{verdict}", authz.resource_key(a.action, a.resource), shown)
    if claimed:  # this approval completed the request: it runs here, once, whatever the client does
        a = await asyncio.shield(_execute(request, a))
    return a


__all__ = ["APPROVALS", "META", "MFA", "POOL", "REVIEWS", "SETTINGS", "SOURCE", "STEP_UP", "STORE", "WAITS_ON"]
__all__ += ["Executor", "NotFound", "audit", "decide_approval", "decide_as", "decided_on", "find_approval"]
__all__ += ["queue_approval"]
__all__ += ["register_executor", "run", "step_up", "waits"]
