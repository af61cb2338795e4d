"""``/modelseal/v1/holds``: list, place and release holds (``governance.holds``; docs/access.md,
"Holds (detector responses)").

``GET holds[?all=1][&limit=N][&after=ID]`` is decided as ``hold.list`` (officers and
auditors) and answers one page of this server's environment's holds (at most
``holds.MAX_PAGE``, oldest first; ``next`` names the ``after`` of the next page). Placing a
hold by hand and releasing one are both decided as ``hold.release``, so only a security
officer with a fresh step-up code (``gov_api.step_up``: ``"otp"`` in the JSON body, bound to
this request's digest) changes holds. The resource is ``Governance:holds`` of **the hold's**
environment (an identity's own, a key's catalog entry's, a source's: this server's), so the
environment boundary keeps another environment's officers out; a hold of another
environment is answered like an unknown one (404). A key hold names a key of this server's
catalog (404 otherwise) and records its canonical backing key. A hand-placed hold on an
identity that holds a ``security-officer`` binding is two-person: it is queued as an approval
(202) and the approval that completes it places it (the ``hold.release`` executor here).

Every change is written to the audit log before it is answered (``hold-place``,
``hold-release``, the reason in the result; the queued writer's own sink, not its queue);
placing an active hold again counts a detection on it and is answered 200 with it (a new
one: 201); a release loses (409) to a detection that arrived after the hold was read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from modelseal.audit.events import AuditEvent
from modelseal.errors import AccessDenied, GovernanceError, IdentityError, KeyNotFound, ModelsealError
from modelseal.governance import holds as hd
from modelseal.governance.holds import HoldStore
from modelseal.governance.model import Resource
from modelseal.governance.store import OFFICER
from modelseal.keys.providers import canonical_key
from modelseal.pki.identity import parse
from modelseal.server import authz, gov_api, keys_api
from modelseal.server import jsonbody as jb
from modelseal.server.auditwriter import AuditWriter
from modelseal.server.identity import IDENTITY

log = logging.getLogger("modelseal.server")
T = TypeVar("T")

HOLDS: web.AppKey[HoldStore] = web.AppKey("gov_holds", HoldStore)


def _answer(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": " ".join(message.split())[:300]}]}, status=status)


async def _run(app: web.Application, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(app[gov_api.POOL], fn, *args)


def _env(app: web.Application) -> str:
    return app[authz.AUTHZ].env


def _resource(env: str) -> Resource:
    return Resource("Governance", "holds", {"env": env})


async def _changed(app: web.Application, event: AuditEvent) -> None:
    """After a change: this worker's view is re-read at its next decision, and ``event`` is
    written to the audit log (synchronously: before the change is answered)."""
    az = app[authz.AUTHZ]
    if az.holds is not None:
        az.holds.invalidate()  # the other workers and instances follow within hd.CACHE_SECONDS
    sink = az.sink.sink if isinstance(az.sink, AuditWriter) else az.sink  # past the queue
    try:
        await _run(app, sink.emit, event)
    except ModelsealError:
        log.error("%s %s was made, but its audit event could not be written", event.operation, event.key)
        raise


def _guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """Typed errors as one-line JSON answers; ``web.HTTPException`` (authz's) passes."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (hd.UnknownHold, KeyNotFound) as e:
            return _answer(404, "NOT_FOUND", str(e))
        except (hd.HoldReleased, hd.HoldChanged, hd.TooManyHolds) as e:
            return _answer(409, "CONFLICT", str(e))
        except AccessDenied as e:
            return _answer(403, "DENIED", str(e))
        except hd.HoldsUnreadable as e:
            log.error("%s %s: %s", request.method, request.path[:120], e)
            return _answer(503, "UNAVAILABLE", str(e))
        except (GovernanceError, IdentityError) as e:
            return _answer(400, "INVALID", str(e))
        except ModelsealError as e:
            log.error("%s %s by %s failed: %s", request.method, request.path[:120], request[IDENTITY].uri, e)
            return _answer(503, "UNAVAILABLE", "the governance state is unavailable; retry later")

    return run


def _limit(text: str | None) -> int:
    if text is None:
        return hd.MAX_PAGE
    if not text.isdigit() or not 1 <= int(text) <= hd.MAX_PAGE:
        raise GovernanceError(f"limit is a whole number from 1 to {hd.MAX_PAGE}")
    return int(text)


async def list_holds(request: web.Request) -> web.Response:
    here = _env(request.app)
    await authz.authorize(request, "hold.list", _resource(here))
    q = request.query
    after = None if q.get("after") is None else hd.check_hold_id(q.get("after"))
    page = functools.partial(request.app[HOLDS].page, here, released=q.get("all") == "1", limit=_limit(q.get("limit")))
    rows, more = await _run(request.app, functools.partial(page, after=after))
    return web.json_response({"holds": [h.to_json() for h in rows], "next": more})


async def _target(app: web.Application, kind: str, subject: str) -> tuple[str, str | None]:
    """The environment of a hold on ``subject`` and, for a key, its canonical backing key."""
    if kind == "identity":
        return parse(subject).env, None
    if kind == "source":
        return _env(app), None
    catalog = app.get(keys_api.CATALOG)
    if catalog is None:
        raise KeyNotFound(f"no broker key {subject}: this server brokers no keys")
    entry = catalog.cached(subject)
    if entry is None:
        entry = await _run(app, catalog.get, subject)
    return entry.env, canonical_key(entry.backing)


def _is_officer(app: web.Application, identity: str) -> bool:
    return any(b.role == OFFICER for b in app[gov_api.STORE].active_for(identity, time.time()))


async def place(request: web.Request) -> web.Response:
    doc = await jb.read_object(request)
    kind, subject = jb.string(doc, "kind", limit=16), jb.string(doc, "subject", limit=2048)
    reason = hd.check_line(jb.string(doc, "reason", limit=hd.MAX_REASON), "a hold's reason")
    hd.check_subject(kind, subject)  # before the code is used up
    params = {"op": "place", "kind": kind, "subject": subject, "reason": reason}
    ctx = await gov_api.step_up(request, "hold.release", "holds", params, jb.otp(doc))
    try:
        env, backing = await _target(request.app, kind, subject)
    except KeyNotFound:  # decided first, over this server's environment: an unknown name is no probe
        await authz.authorize(request, "hold.release", _resource(_env(request.app)), ctx)
        raise
    if kind == "identity" and await _run(request.app, _is_officer, request.app, subject):
        # An officer is held by two: the approval that completes this places it (execute_place).
        return await gov_api.queue_approval(request, "hold.release", _resource(env), {**params, "env": env}, ctx)
    await authz.authorize(request, "hold.release", _resource(env), ctx)
    who = request[IDENTITY].uri
    fn = functools.partial(request.app[HOLDS].place_once, env=env, backing=backing)
    h, new = await _run(request.app, fn, kind, subject, reason, who)
    if new:
        await _changed(request.app, hd.place_event(h, authz.request_source(request)))
        log.warning("HOLD %s placed on %s %s in %s by %s: %s", h.id, h.kind, h.subject, h.env, who, h.reason)
    return web.json_response(h.to_json(), status=201 if new else 200)


async def execute_place(app: web.Application, params: dict[str, Any], requester: str) -> dict[str, Any]:
    """The ``hold.release`` executor: place the approved hold on an officer."""
    if params.get("op") != "place":
        raise GovernanceError("an approved hold.release request places a hold")
    kind, subject, reason, env = (str(params.get(k, "")) for k in ("kind", "subject", "reason", "env"))
    fn = functools.partial(app[HOLDS].place_once, env=env)
    h, new = await _run(app, fn, kind, subject, reason, requester)
    if new:
        await _changed(app, hd.place_event(h))
        log.warning(
            "HOLD %s placed on officer %s in %s (approved, asked by %s): %s", h.id, subject, env, requester, reason
        )
    return {"hold": h.id, "kind": h.kind, "subject": h.subject, "env": h.env, "created": new}


async def release(request: web.Request) -> web.Response:
    hold_id = request.match_info["id"]
    doc = await jb.read_object(request)
    reason = jb.string(doc, "reason", limit=hd.MAX_REASON, default="")
    params = {"op": "release", "reason": reason}
    ctx = await gov_api.step_up(request, "hold.release", hold_id[:40], params, jb.otp(doc))
    here, store = _env(request.app), request.app[HOLDS]
    try:
        h = await _run(request.app, store.get, hd.check_hold_id(hold_id))
    except hd.HoldsUnreadable:
        raise
    except GovernanceError:  # a malformed id: no such hold
        h = None
    if h is None or h.env != here:  # decided over this server's environment, then unknown: no probe
        await authz.authorize(request, "hold.release", _resource(here), ctx)
        raise hd.UnknownHold(f"no hold {hold_id[:40]!r}")
    await authz.authorize(request, "hold.release", _resource(h.env), ctx)
    who = request[IDENTITY].uri
    fn = functools.partial(store.release, env=here, seen=h.detections)  # a detection since loses the release
    gone = await _run(request.app, fn, h.id, who, reason)
    await _changed(request.app, hd.release_event(gone, authz.request_source(request)))
    log.warning("HOLD %s on %s %s released by %s: %s", h.id, h.kind, h.subject, who, reason)
    return web.json_response(gone.to_json())


def add_routes(app: web.Application, store: HoldStore) -> None:
    """Mount the hold routes on ``app`` (after ``gov_api.add_routes``: its MFA and pool) and
    register the executor of an approved hold on an officer."""
    app[HOLDS] = store
    r, p = app.router, gov_api.PREFIX
    r.add_get(f"{p}/holds", _guarded(list_holds))
    r.add_post(f"{p}/holds", _guarded(place))
    r.add_post(p + "/holds/{id}/release", _guarded(release))
    gov_api.register_executor("hold.release", execute_place)


__all__ = ["HOLDS", "add_routes", "execute_place"]
