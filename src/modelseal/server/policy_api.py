"""``/modelseal/v1/policy``: the policy in force, its versions, proposals and activation
(docs/governance.md, "Change management").

``GET policy`` (the active set, ``policy.read``), ``GET policy/versions`` and
``GET policy/versions/{digest}`` (``policy.read``), ``POST policy/versions`` (propose:
``{"text", "note", "otp"}``, step-up MFA bound to the text's digest, ``policy.propose``; the
text is parsed and kept, and takes no effect), ``POST policy/activate`` (``{"digest", "otp"}``:
a two-person action, so it is queued as an approval, 202, and the approval that completes it
runs the ``policy.activate`` executor registered here exactly once, which pins the digest in
``governance.versions.PolicyStore``). Every route is decided by ``server.authz``; the
handler parses, asks, calls the store in a thread and answers one-line JSON errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from modelseal.audit.events import AuditEvent
from modelseal.errors import GovernanceError, ModelsealError
from modelseal.governance.cedar import PolicySet
from modelseal.governance.model import Resource
from modelseal.governance.versions import DEFAULT, PolicyStore, UnknownVersion, check_digest, digest_of
from modelseal.server import authz, gov_api
from modelseal.server import jsonbody as jb
from modelseal.server.identity import IDENTITY

log = logging.getLogger("modelseal.server")
T = TypeVar("T")

PREFIX = "/modelseal/v1/policy"
POLICY_STORE: web.AppKey[PolicyStore] = web.AppKey("gov_policy_store", PolicyStore)
MAX_NOTE = 400


class NotFound(GovernanceError):
    """No such policy version (404)."""


def _answer(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": " ".join(message.split())[:300]}]}, status=status)


async def _run(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _resource(request: web.Request, **attrs: object) -> Resource:
    return Resource("Governance", "policy", {"env": request[IDENTITY].env, **attrs})


def _summary(ps: PolicySet) -> dict[str, object]:
    return {
        "digest": ps.digest,
        "ids": list(ps.ids),
        "standards": sorted(ps.standards),
        "exceptions": [e.describe() for e in ps.exceptions],
    }


async def _version(store: PolicyStore, digest: str) -> Any:
    try:
        return await _run(store.get, check_digest(digest))
    except UnknownVersion as e:
        raise NotFound(str(e)) from None


def _guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """Typed errors as one-line JSON answers; ``web.HTTPException`` (authz's) passes."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except NotFound as e:
            return _answer(404, "NOT_FOUND", str(e))
        except GovernanceError as e:
            if "tampered" in str(e):
                log.error("policy store: %s", e)
                return _answer(503, "UNAVAILABLE", str(e))
            return _answer(400, "INVALID", str(e))
        except ModelsealError as e:
            log.error("%s %s by %s failed: %s", request.method, request.path[:120], request[IDENTITY].uri, e)
            return _answer(503, "UNAVAILABLE", "the governance state is unavailable; retry later")

    return run


async def show_active(request: web.Request) -> web.Response:
    await authz.authorize(request, "policy.read", _resource(request))
    store = request.app[POLICY_STORE]
    active = await _run(store.active)
    a = await _run(store.activation)
    body: dict[str, Any] = {**_summary(active), "text": active.text, "source": DEFAULT if a is None else "activated"}
    if a is not None:
        body["activation"] = {"seq": a.seq, "requested_by": a.requested_by, "approvals": list(a.approvals)}
        body["activation"]["activated"] = a.activated
    return web.json_response(body)


async def list_versions(request: web.Request) -> web.Response:
    await authz.authorize(request, "policy.read", _resource(request))
    store = request.app[POLICY_STORE]
    rows = await _run(store.versions)
    active = await _run(store.active_digest)
    return web.json_response({"active": active, "versions": [v.to_json() for v in rows]})


async def show_version(request: web.Request) -> web.Response:
    await authz.authorize(request, "policy.read", _resource(request))
    v = await _version(request.app[POLICY_STORE], request.match_info["digest"])
    ps = PolicySet.parse(v.text, f"policy {v.digest}")
    return web.json_response({**v.to_json(with_text=True), **_summary(ps)})


async def propose(request: web.Request) -> web.Response:
    doc = await jb.read_object(request, max_depth=4, max_values=100)
    text = jb.string(doc, "text", 1 << 20)
    note = jb.string(doc, "note", MAX_NOTE, "")
    digest = digest_of(text)
    ctx = await gov_api.step_up(request, "policy.propose", digest, {"digest": digest, "note": note}, jb.otp(doc))
    await authz.authorize(request, "policy.propose", _resource(request, digest=digest), ctx)
    who = request[IDENTITY].uri
    v = await _run(request.app[POLICY_STORE].propose, text, who, note)
    request.app[authz.AUTHZ].sink.emit(AuditEvent("policy-propose", f"policy:{v.digest}", "ok", actor=who))
    log.info("policy %s proposed by %s", v.digest, who)
    return web.json_response(v.to_json(), status=201)


async def activate(request: web.Request) -> web.Response:
    doc = await jb.read_object(request, max_depth=4, max_values=100)
    digest = check_digest(jb.string(doc, "digest", 80))
    v = await _version(request.app[POLICY_STORE], digest)  # it must exist and hash to its digest now
    PolicySet.parse(v.text, f"policy {digest}")
    params = {"digest": digest}
    ctx = await gov_api.step_up(request, "policy.activate", digest, params, jb.otp(doc))
    return await gov_api.queue_approval(request, "policy.activate", _resource(request, digest=digest), params, ctx)


async def _approvers(app: web.Application, digest: str, requester: str) -> list[str]:
    """The officers who approved the running request (the executor is not handed them):
    recorded with the activation; the approvals table and its events stay the evidence."""
    store = app.get(gov_api.APPROVALS)
    if store is None:
        return []
    rows = await _run(store.recent, 50)
    mine = [a for a in rows if a.action == "policy.activate" and a.state == "running" and a.requester == requester]
    return next((list(a.approvers) for a in mine if a.params.get("digest") == digest), [])


async def execute_activate(app: web.Application, params: dict[str, Any], requester: str) -> dict[str, Any]:
    """The ``policy.activate`` executor: pin the approved digest (in force within the
    decider's cache period, ``server.authz.CACHE_SECONDS``)."""
    digest = check_digest(str(params.get("digest", "")))
    a = await _run(app[POLICY_STORE].activate, digest, requester, await _approvers(app, digest, requester))
    log.warning("policy %s activated (activation %d, requested by %s)", digest, a.seq, requester)
    return {"digest": a.digest, "seq": a.seq, "activated": a.activated}


def add_routes(app: web.Application, store: PolicyStore) -> None:
    """Mount the policy routes on ``app`` (behind the identity middleware and ``authz``) and
    register the ``policy.activate`` executor."""
    app[POLICY_STORE] = store
    routes = [
        ("GET", "", show_active),
        ("GET", "/versions", list_versions),
        ("GET", "/versions/{digest}", show_version),
        ("POST", "/versions", propose),
        ("POST", "/activate", activate),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, PREFIX + path, _guarded(handler))
    gov_api.register_executor("policy.activate", execute_activate)


__all__ = ["POLICY_STORE", "PREFIX", "add_routes", "execute_activate"]
