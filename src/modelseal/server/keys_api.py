"""``/modelseal/v1/keys``: the key broker (docs/broker.md), over the server's own providers.

Routes (mutual-TLS JSON; the caller is the verified certificate's identity):
``POST keys/wrap``, ``POST keys/unwrap`` and ``POST keys/rewrap`` (batched, at most
``MAX_ITEMS`` items), ``GET keys``, ``GET keys/{name}``, ``POST keys`` (create) and
``POST keys/{name}/rotate|disable|enable|destroy``. A handler parses the body, looks the
broker key up in the catalog (``governance.brokerkeys``), asks ``server.authz`` once per
distinct key and environment, and calls ``keys.service.KeyService`` in a worker thread
with the caller as the audit event's actor. Lifecycle operations need step-up MFA
(``gov_api.step_up``); ``destroy`` needs two officers (``gov_api.queue_approval``; the
registered ``key.destroy`` executor runs it once approved), and so do ``rotate``, ``disable``
and ``enable`` where ``[governance] two_person`` names them (``gov_decide.waits``; their
executors: ``change_executor``).

The artifact never chooses a key: a recipient's broker NAME is looked up here, and its
inner (backing) recipient must name exactly that entry's backing key
(``brokerkeys.check_inner``); the context's ``env`` must be the key's. Data keys travel
base64 in the bodies of this mutual-TLS connection only: never logged, never in an error
text, never cached here (``KeyService.unwrap(cache=False)``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from modelseal.audit.events import AuditSink
from modelseal.errors import (
    AccessDenied,
    DecryptionError,
    GovernanceError,
    KeyDisabled,
    KeyNotFound,
    KeyProviderError,
    KeystoreError,
    ModelsealError,
    PolicyDenied,
    ProviderUnavailable,
)
from modelseal.format.header import MAX_WRAPPED, normalize_context
from modelseal.governance import brokerkeys as bk
from modelseal.governance import brokerops as ops
from modelseal.governance.model import Resource
from modelseal.keys.providers import KeyInfo, canonical_key, parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.server import authz, gov_api, gov_decide
from modelseal.server.identity import IDENTITY
from modelseal.server.jsonbody import BadRequest, otp, read_object

log = logging.getLogger("modelseal.server")
T = TypeVar("T")

PREFIX = "/modelseal/v1/keys"
MAX_ITEMS = 1000
MAX_JSON_VALUES = 100 * MAX_ITEMS  # an item with a full 64-entry context is about 70 values
SVC: web.AppKey[KeyService] = web.AppKey("key_service", KeyService)
DATA: web.AppKey[KeyService] = web.AppKey("key_service_data", KeyService)  # wrap/unwrap/rewrap
CATALOG: web.AppKey[bk.BrokerKeys] = web.AppKey("broker_keys", bk.BrokerKeys)
POOL: web.AppKey[ThreadPoolExecutor] = web.AppKey("key_pool", ThreadPoolExecutor)
# Item errors by class (most specific first): the code the client maps back to the same class.
CODES: tuple[tuple[type[ModelsealError], str], ...] = (
    (DecryptionError, "DECRYPTION_FAILED"),
    (KeyNotFound, "KEY_UNKNOWN"),
    (KeyDisabled, "KEY_DISABLED"),
    (ProviderUnavailable, "UNAVAILABLE"),
    (KeystoreError, "UNAVAILABLE"),
    (KeyProviderError, "PROVIDER_FAILED"),
    (PolicyDenied, "DENIED"),
    (AccessDenied, "DENIED"),
    (GovernanceError, "INVALID"),
)
STATUS = {"DECRYPTION_FAILED": 422, "KEY_UNKNOWN": 404, "KEY_DISABLED": 409, "UNAVAILABLE": 503}
STATUS |= {"PROVIDER_FAILED": 502, "DENIED": 403, "INVALID": 400, "FAILED": 500}


def code_of(e: ModelsealError) -> str:
    return next((c for cls, c in CODES if isinstance(e, cls)), "FAILED")


def _item_error(e: ModelsealError) -> dict[str, object]:
    # DecryptionError's message is fixed; providers' messages are KeyService's normalised ones.
    return {"error": {"code": code_of(e), "message": str(e)[:300]}}


def hidden(e: ModelsealError, entry: bk.BrokerKey) -> ModelsealError:
    """``e`` naming the broker key instead of its backing key (the catalog's, not the
    caller's business): every spelling of the backing key in its message is replaced."""
    ref = parse_key_uri(entry.backing)
    spellings = {entry.backing, ref.name, ref.name.rpartition("/")[2]}
    with contextlib.suppress(ModelsealError):
        spellings.add(canonical_key(entry.backing))
    text = str(e)
    for spelled in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelled, entry.uri)
    if text == str(e):
        return e
    out = copy.copy(e)
    out.args = (text,)
    return out


async def _for(request: web.Request, entry: bk.BrokerKey, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread; its error names ``entry``, never the backing key."""
    try:
        return await _run(request, fn, *args)
    except ModelsealError as e:
        raise hidden(e, entry) from None


def _answer(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message[:300]}]}, status=status)


# -- parsing ---------------------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_object(request, max_values=MAX_JSON_VALUES)


def _b64(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * (limit // 3 + 2):
        raise BadRequest(f"{what} must be base64 of at most {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not base64") from None
    if not 1 <= len(data) <= limit:
        raise BadRequest(f"{what} must be 1 to {limit} bytes")
    return data


def _context(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise BadRequest("context must be an object of strings")
    try:
        return normalize_context(value)
    except ValueError as e:
        raise BadRequest(f"context: {e}") from None


def _version(value: object, what: str = "version") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**32:
        raise BadRequest(f"{what} must be a whole number from 1")
    return value


def _items(doc: dict[str, Any]) -> list[tuple[str, int, bytes, tuple[tuple[str, str], ...]]]:
    items = doc.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise BadRequest(f"items must be a list of 1 to {MAX_ITEMS} wrapped keys")
    out = []
    for it in items:
        if not isinstance(it, dict):
            raise BadRequest("each item is an object: key, version, wrapped, context")
        name = bk.check_name(it.get("key"))
        out.append(
            (
                name,
                _version(it.get("version")),
                _b64(it.get("wrapped"), "wrapped", MAX_WRAPPED),
                _context(it.get("context")),
            )
        )
    return out


def describe(svc: KeyService, entry: bk.BrokerKey) -> dict[str, object]:
    """A catalog entry as the API shows it, with its backing key's versions."""
    out: dict[str, object] = {"name": entry.name, "env": entry.env, "provider": parse_key_uri(entry.backing).scheme}
    out |= {"created_by": entry.created_by, "created": entry.created, "static": entry.static}
    out["destroyed"] = entry.destroyed
    if entry.destroyed is None:
        try:
            out |= info_json(svc.info(entry.backing))
        except ModelsealError as e:
            out["error"] = {"code": code_of(e), "message": str(hidden(e, entry))[:300]}
    return out


def info_json(info: KeyInfo) -> dict[str, object]:
    versions = [{"version": v.version, "created": v.created, "state": v.state} for v in info.versions]
    return {"versions": versions, "min_decryption_version": info.min_decryption_version}


# -- handlers --------------------------------------------------------------------------


async def _run(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(request.app[POOL], fn, *args)


def _who(request: web.Request) -> str:
    return request[IDENTITY].uri


async def _entry(request: web.Request, name: str, action: str, context: dict[str, object]) -> bk.BrokerKey:
    """The catalog entry of ``name``, after the decision on ``action`` over it. An unknown
    name is decided over this server's environment first, so it is not a probe."""
    try:
        entry = request.app[CATALOG].cached(name)
        if entry is None:
            entry = await _run(request, request.app[CATALOG].get, name)
    except KeyNotFound:
        await authz.authorize(request, action, Resource("Key", name, {"env": request[IDENTITY].env}), context)
        raise
    attrs = {"env": entry.env, "provider": parse_key_uri(entry.backing).scheme}
    await authz.authorize(request, action, Resource("Key", name, attrs), context)
    return entry


def _guarded(handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
    """Typed errors as one-line JSON answers. ``web.HTTPException`` (authz's 403/429,
    gov_api's answers) passes through."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except ModelsealError as e:
            code = code_of(e)
            if STATUS[code] >= 500:
                log.error("%s %s by %s failed: %s", request.method, request.path[:120], _who(request), code)
            return _answer(STATUS[code], code, str(e))

    return run


async def wrap(request: web.Request) -> web.Response:
    doc = await _body(request)
    name = bk.check_name(doc.get("key"))
    dek = _b64(doc.get("dek"), "dek", 32)
    if len(dek) != 32:
        raise BadRequest("dek must be a 32-byte data key")
    ctx = _context(doc.get("context"))
    entry = await _entry(request, name, "key.wrap", {"artifact_env": dict(ctx).get("env", "")})
    r = await _for(request, entry, ops.wrap_one, request.app[DATA], entry, dek, ctx, _who(request))
    return web.json_response({"key": name, "version": r.key_version, "wrapped": base64.b64encode(r.wrapped).decode()})


async def _batch(request: web.Request, action: str, work: Callable[..., list[Any]]) -> list[Any]:
    items = _items(await _body(request))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (name, _, _, ctx) in enumerate(items):
        groups.setdefault((name, dict(ctx).get("env", "")), []).append(i)
    # Every group is decided before any key is touched: a request is served whole or refused.
    entries = {g: await _entry(request, g[0], action, {"artifact_env": g[1]}) for g in groups}
    results: list[Any] = [None] * len(items)
    for group, idx in groups.items():
        entry = entries[group]
        part = [(items[i][1], items[i][2], items[i][3]) for i in idx]
        got = await _for(request, entry, work, request.app[DATA], entry, part, _who(request))
        for i, one in zip(idx, got, strict=True):
            results[i] = hidden(one, entry) if isinstance(one, ModelsealError) else one
    failed = sum(isinstance(r, ModelsealError) for r in results)
    log.info("%s of %d keys by %s (%d failed)", action, len(items), _who(request), failed)
    return results


async def unwrap(request: web.Request) -> web.Response:
    results = await _batch(request, "key.unwrap", ops.unwrap_items)
    out = [_item_error(r) if isinstance(r, ModelsealError) else {"dek": base64.b64encode(r).decode()} for r in results]
    return web.json_response({"results": out})


async def rewrap(request: web.Request) -> web.Response:
    results = await _batch(request, "key.rewrap", ops.rewrap_items)
    out = [
        _item_error(r)
        if isinstance(r, ModelsealError)
        else {"version": r.key_version, "wrapped": base64.b64encode(r.wrapped).decode()}
        for r in results
    ]
    return web.json_response({"results": out})


async def list_keys(request: web.Request) -> web.Response:
    entries: list[bk.BrokerKey] = await _run(request, request.app[CATALOG].all)
    shown = []
    for env in sorted({e.env for e in entries}):
        try:
            await authz.authorize(request, "key.list", Resource("Key", "*", {"env": env}))
        except authz.Refusal as r:
            if r.status_code != 403:
                raise
            continue  # keys of an environment the caller may not list are left out
        for e in (e for e in entries if e.env == env):
            shown.append(await _run(request, describe, request.app[SVC], e))
    return web.json_response({"keys": sorted(shown, key=lambda k: str(k["name"]))})


async def show_key(request: web.Request) -> web.Response:
    entry = await _entry(request, bk.check_name(request.match_info["name"]), "key.list", {})
    return web.json_response(await _run(request, describe, request.app[SVC], entry))


# -- lifecycle ---------------------------------------------------------------------------


async def _step_up(
    request: web.Request, action: str, name: str, params: dict[str, object], otp: str | None
) -> dict[str, object]:
    """``gov_api.step_up``; a server without the MFA and approval tables refuses (503)."""
    if gov_api.MFA not in request.app or gov_api.APPROVALS not in request.app:
        raise authz.Refusal(503, "UNAVAILABLE", "this server has no MFA and approvals: key lifecycle is not served")
    return await gov_api.step_up(request, action, name, params, otp)


async def create(request: web.Request) -> web.Response:
    doc = await _body(request)
    name = bk.check_name(doc.get("name"))
    env = bk.check_env(doc.get("env") or request[IDENTITY].env)
    params: dict[str, object] = {"name": name, "env": env}
    mfa = await _step_up(request, "key.create", name, params, otp(doc))
    await authz.authorize(request, "key.create", Resource("Key", name, {"env": env}), mfa)
    app = request.app
    entry = await _run(request, ops.create_key, app[SVC], app[CATALOG], name, env, _who(request))
    log.info("broker key %s created for env %s by %s", name, env, _who(request))
    return web.json_response(await _run(request, describe, app[SVC], entry), status=201)


async def lifecycle(request: web.Request) -> web.StreamResponse:
    op, name = request.match_info["op"], bk.check_name(request.match_info["name"])
    doc = await _body(request)
    version = None if doc.get("version") is None else _version(doc["version"])
    params: dict[str, object] = {"name": name, "version": version}
    action = f"key.{op}"
    mfa = await _step_up(request, action, name, params, otp(doc))
    if op == "destroy" or gov_decide.waits(request.app, action):  # two-person: run by its executor once approved
        entry = await _entry(request, name, "key.list", {})
        ops.check_change(op, version)  # refused now, not once approved
        res = Resource("Key", name, {"env": entry.env, "provider": parse_key_uri(entry.backing).scheme})
        return await gov_api.queue_approval(request, action, res, params, mfa)
    entry = await _entry(request, name, action, mfa)
    await _for(request, entry, ops.change, request.app[SVC], entry, op, version, _who(request))
    log.info("broker key %s: %s%s by %s", name, op, f" version {version}" if version else "", _who(request))
    return web.json_response(await _run(request, describe, request.app[SVC], entry))


async def execute_destroy(app: web.Application, params: dict[str, Any], requester: str) -> dict[str, object]:
    """The ``key.destroy`` executor: run by the approval that completes the two-person rule."""
    name, version = bk.check_name(params.get("name")), params.get("version")
    version = None if version is None else _version(version)
    loop = asyncio.get_running_loop()
    out: dict[str, object] = await loop.run_in_executor(
        app[POOL], ops.destroy_now, app[SVC], app[CATALOG], name, version, requester
    )
    log.info("broker key %s: destroyed %s, requested by %s", name, out["destroyed"], requester)
    return out


def change_executor(op: str) -> gov_api.Executor:
    """The executor of an approved ``key.OP`` (rotate, disable, enable) that ``[governance]
    two_person`` made wait: the change, by the requester; its result names the key's newest
    version (``version``) and the version states after it."""

    async def execute(app: web.Application, params: dict[str, Any], requester: str) -> dict[str, Any]:
        name, version = bk.check_name(params.get("name")), params.get("version")
        version = None if version is None else _version(version)

        def work() -> dict[str, Any]:
            entry = app[CATALOG].get(name)
            try:
                ops.change(app[SVC], entry, op, version, requester)
                info = app[SVC].info(entry.backing)
            except ModelsealError as e:  # recorded on the approval: never the backing key's name
                raise hidden(e, entry) from None
            states = {str(v.version): v.state for v in info.versions}
            return {"key": name, "op": op, "version": max(v.version for v in info.versions), "states": states}

        out: dict[str, Any] = await asyncio.get_running_loop().run_in_executor(app[POOL], work)
        log.info("broker key %s: %s (approved) requested by %s, newest version %s", name, op, requester, out["version"])
        return out

    return execute


def add_routes(
    app: web.Application, svc: KeyService, keys: bk.BrokerKeys, threads: int = 8, audit: AuditSink | None = None
) -> None:
    """Mount the key broker on ``app`` (behind the identity middleware and ``authz``). With
    ``audit`` (the server's queued writer, ``server.auditwriter``), the events of wrap, unwrap
    and rewrap go there, like the decisions; lifecycle events stay on ``svc``'s own sink,
    written before the change is reported (and checked for before it is made)."""
    app[SVC], app[CATALOG] = svc, keys
    app[DATA] = svc.with_sink(audit) if audit is not None else svc
    app[POOL] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="keys")

    async def stop(app: web.Application) -> None:
        app[POOL].shutdown(wait=False, cancel_futures=True)
        keys.close()

    app.on_cleanup.append(stop)
    r = app.router
    r.add_post(f"{PREFIX}/wrap", _guarded(wrap))
    r.add_post(f"{PREFIX}/unwrap", _guarded(unwrap))
    r.add_post(f"{PREFIX}/rewrap", _guarded(rewrap))
    r.add_get(PREFIX, _guarded(list_keys))
    r.add_post(PREFIX, _guarded(create))
    r.add_get(PREFIX + "/{name}", _guarded(show_key))
    r.add_post(PREFIX + "/{name}/{op:rotate|disable|enable|destroy}", _guarded(lifecycle))
    gov_api.register_executor("key.destroy", execute_destroy)
    for op in ("rotate", "disable", "enable"):  # run only where [governance] two_person queued them
        gov_api.register_executor(f"key.{op}", change_executor(op))


__all__ = ["CATALOG", "MAX_ITEMS", "PREFIX", "SVC", "add_routes", "code_of"]
