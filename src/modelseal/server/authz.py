"""The one decider of ``modelseal serve``: every request a handler serves is authorized
here, once, by Cedar (``governance.cedar``), default deny.

``Authz.authorize`` builds ``model.Principal`` from the verified identity the middleware
put in ``request[IDENTITY]`` (``server.identity``) and its active bindings
(``governance.store``), the ``model.Request`` with the server's own facts in its context
(``now``, the connection's ``tls_version``, ``two_person`` when ``[governance] two_person``
names the action (``Authz.two_person``, set by ``server.gov_api``; the forbid
``gov-two-person-configured``); ``mfa``/``approved`` only from the handler, which verified
them; ``anomaly`` 0), asks ``Engine.decide`` and audits the decision: actor = the
identity, operation ``authorize``, key ``ACTION TYPE:ID``, result ``allow:IDS``, ``deny:IDS``
or ``allow-exception:ID`` (the ids of the policies that decided; ``deny:default`` for the
default deny). A break-glass binding that contributed a role is a warning in the log and a
``break-glass-use`` event; an exception that has expired is an ``exception-expired`` event.
A hold (``governance.holds``: an identity, a source or a key pending review) denies ahead of
Cedar, audited ``deny:hold:ID``; a deny where an expired binding matched the identity moves
``modelseal_expired_credentials_total{kind="grant"}``.

Caching, and what N instances see: an identity's active bindings are kept in memory for
at most ``CACHE_SECONDS`` (2 s), and the active policy set too, so a binding, an unbind or a
policy activation made through any worker or instance is in force everywhere within 2 s.
Expiry needs no refresh: ``Binding.active(now)`` is checked at every decision.

Refusals are one-line OCI error bodies: 403 ``DENIED`` with the decision's reason; 429
``TOOMANYREQUESTS`` with ``Retry-After`` once an identity has used up its denials (a token
bucket, ``DENIAL_BURST`` per ``DENIAL_WINDOW`` seconds, per worker process): its requests are
then refused without being evaluated, while other identities are served as before; 503 when
the active policy fails its digest (tampered: every decision is a deny until it is fixed)
or the governance state cannot be read. A refusal closes nothing: the connection stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.errors import GovernanceError, ModelsealError
from modelseal.governance import cedar
from modelseal.governance.holds import HoldIndex, deny_reason
from modelseal.governance.holds import check as held_by
from modelseal.governance.model import Binding, Decision, Principal, Request, Resource
from modelseal.governance.store import GovStore
from modelseal.pki.identity import Identity
from modelseal.server.hygiene import source_of
from modelseal.server.identity import IDENTITY
from modelseal.telemetry.metrics import EXPIRED_CREDENTIALS

log = logging.getLogger("modelseal.server")

CACHE_SECONDS = 2.0  # bindings and the active policy: a change is seen everywhere within this
DENIAL_BURST = 20  # denials an identity may collect at once ...
DENIAL_WINDOW = 10.0  # ... refilled over this many seconds
MAX_TRACKED = 100_000  # identities with a bucket or a cache entry, per process
TAMPERED = "the active policy fails its digest"
TWO_PERSON_CONFIGURED = "gov-two-person-configured"  # the forbid of context.two_person


class PolicySource(Protocol):
    """Where the active policy set comes from (``governance.versions.PolicyStore``)."""

    def active(self) -> cedar.PolicySet: ...


@dataclass(frozen=True)
class FixedPolicy:
    """A policy set that never changes (tests, benchmarks, a server without a policy store)."""

    policies: cedar.PolicySet

    def active(self) -> cedar.PolicySet:
        return self.policies


class Refusal(web.HTTPException):
    """A refused request: the status, the OCI error body and its one-line ``reason``."""

    def __init__(self, status: int, code: str, reason: str, headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status
        self.reason_line = " ".join(reason.split())[:300]
        self.extra = dict(headers or {})
        body = json.dumps({"errors": [{"code": code, "message": self.reason_line, "detail": {}}]})
        super().__init__(text=body, content_type="application/json", headers=headers)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class DenialLimiter:
    """Denials per identity as a token bucket: ``burst`` tokens, refilled at
    ``burst / window`` per second; a denial takes one. Thread-safe, bounded in size."""

    def __init__(self, burst: int = DENIAL_BURST, window: float = DENIAL_WINDOW) -> None:
        self.burst, self.rate = float(burst), burst / window
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _level(self, who: str, now: float) -> _Bucket:
        b = self._buckets.get(who)
        if b is None:
            return _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
        b.stamp = now
        return b

    def retry_after(self, who: str, now: float) -> int:
        """0 when ``who`` may be evaluated, else the whole seconds until one denial is refilled."""
        with self._lock:
            if who not in self._buckets:
                return 0
            b = self._level(who, now)
            if b.tokens >= 1.0:
                return 0
            return max(1, math.ceil((1.0 - b.tokens) / self.rate))

    def denied(self, who: str, now: float) -> None:
        with self._lock:
            b = self._level(who, now)
            b.tokens = max(0.0, b.tokens - 1.0)
            if who not in self._buckets:
                if len(self._buckets) >= MAX_TRACKED:  # keep only those still short of tokens
                    self._buckets = {k: v for k, v in self._buckets.items() if self._level(k, now).tokens < self.burst}
                self._buckets[who] = b


def tls_version(request: web.Request) -> str:
    """The negotiated protocol of the request's connection (``TLSv1.3``), "" without TLS."""
    transport = request.transport
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return obj.version() or ""
    return ""


def request_source(request: web.Request) -> str | None:
    """The request's peer address (``hygiene.source_of``: an IPv6 /64 counts as one), None without one."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return source_of(peer) if peer else None


def resource_key(action: str, resource: Resource) -> str:
    """The audit event's ``key``: what was asked for, on what."""
    return f"{action} {resource.type}:{resource.id}"


def audit_result(d: Decision) -> str:
    if d.allowed and d.exception:
        return f"allow-exception:{d.exception}"
    ids = ",".join(d.policies)
    return f"allow:{ids}" if d.allowed else f"deny:{ids or 'default'}"


class Authz:
    """The decider of one server: its ``env`` and ``trust_domain``, the bindings in
    ``store``, the active policy of ``policies``, decisions audited to ``sink``."""

    def __init__(
        self,
        store: GovStore,
        policies: PolicySource | cedar.PolicySet | None,
        env: str,
        trust_domain: str,
        sink: AuditSink,
        *,
        now: Callable[[], float] = time.time,
        cache_seconds: float = CACHE_SECONDS,
        limiter: DenialLimiter | None = None,
        threads: int = 4,
        holds: HoldIndex | None = None,
        two_person: Collection[str] = (),
    ) -> None:
        if policies is None:
            policies = cedar.default_policy()
        self.policies: PolicySource = FixedPolicy(policies) if isinstance(policies, cedar.PolicySet) else policies
        self.store, self.env, self.trust_domain, self.sink = store, env, trust_domain, sink
        self.now, self.cache_seconds = now, cache_seconds
        self.limiter = limiter or DenialLimiter()
        self.holds = holds
        self.two_person = frozenset(two_person)  # the actions [governance] two_person adds
        self._lock = threading.Lock()
        self._bindings: dict[str, tuple[float, tuple[Binding, ...]]] = {}
        self._engine: cedar.Engine | None = None
        self._digest = ""
        self._policy_checked = -math.inf
        self._policy_error: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._threads = threads

    # -- state, cached ------------------------------------------------------------------

    def bindings_for(self, identity: str, t: float) -> tuple[Binding, ...]:
        """The bindings matching ``identity``, read at most every ``cache_seconds``; the
        ones active at ``t``."""
        return tuple(b for b in self._matching(identity) if b.active(t))

    def _matching(self, identity: str) -> tuple[Binding, ...]:
        mono = time.monotonic()
        with self._lock:
            hit = self._bindings.get(identity)
        if hit is None or mono - hit[0] >= self.cache_seconds:
            # active_for(-inf): every matching binding; expiry is checked below, per decision
            hit = (mono, self.store.active_for(identity, -math.inf))
            with self._lock:
                if len(self._bindings) >= MAX_TRACKED:
                    self._bindings.clear()
                self._bindings[identity] = hit
        return hit[1]

    def _held(self, identity: str, source: str | None, action: str, resource: Resource) -> Decision | None:
        """The deny of a hold on the identity, the source or the key (``governance.holds``)."""
        h = None if self.holds is None else held_by(self.holds, identity, source, action, resource)
        return None if h is None else Decision(False, (f"hold:{h.id}",), deny_reason(h))

    def engine(self) -> cedar.Engine:
        """The engine over the active policy set, re-read at most every ``cache_seconds``;
        ``GovernanceError`` while the active policy fails its digest or cannot be read."""
        mono = time.monotonic()
        with self._lock:
            fresh = mono - self._policy_checked < self.cache_seconds
            engine, error = self._engine, self._policy_error
        if fresh:
            if error is not None or engine is None:
                raise GovernanceError(error or TAMPERED)
            return engine
        try:
            active = self.policies.active()
        except ModelsealError as e:
            why = TAMPERED if "digest" in str(e) else "the active policy cannot be read"
            log.error("%s: %s", why, e)
            with self._lock:
                self._policy_checked, self._policy_error, self._engine = mono, why, None
            raise GovernanceError(why) from None
        with self._lock:
            if self._engine is None or active.digest != self._digest:
                self._engine, self._digest = cedar.Engine(active, now=self.now), active.digest
                log.info("active policy %s (%d policies)", active.digest, len(active.ids))
            self._policy_checked, self._policy_error = mono, None
            return self._engine

    # -- the decision -------------------------------------------------------------------

    def principal(self, ident: Identity, t: float) -> Principal:
        return Principal(ident.uri, ident.env, ident.kind, ident.trust_domain, self.bindings_for(ident.uri, t))

    def decide(
        self,
        ident: Identity,
        action: str,
        resource: Resource,
        context: Mapping[str, object] | None = None,
        source: str | None = None,
        *,
        operation: str = "authorize",
    ) -> Decision:
        """Decide and audit one request of ``ident`` (synchronous; I/O only when a cache is
        stale, and the audit event). ``context``: the handler's facts (``mfa``, ``mfa_age``,
        ``approved``, ``approvals``, ``tls_version``, per-action extras). Raises
        ``GovernanceError`` when no decision can be made (the policy or the bindings
        unavailable); that, too, is audited as a deny. ``source``: the caller's address,
        recorded on the events (the detectors' network paths). A hold (``governance.holds``)
        denies ahead of Cedar: result ``deny:hold:ID``. ``operation``: the decision's event
        (``console-view``: the web console asking what to show, which the detectors, keyed on
        ``authorize``, do not count as an attempt)."""
        t = self.now()
        key = resource_key(action, resource)
        try:
            held = self._held(ident.uri, source, action, resource)
            engine = self.engine()
            principal = self.principal(ident, t)
        except ModelsealError as e:
            self.sink.emit(AuditEvent("authorize", key, "deny:unavailable", actor=ident.uri, time=t, source=source))
            raise GovernanceError(str(e) if str(e) == TAMPERED else "the governance state cannot be read") from None
        ctx: dict[str, object] = {"mfa": False, "mfa_age": -1, "approved": False, "approvals": 0, "tls_version": ""}
        ctx.update(context or {})
        ctx["now"], ctx["anomaly"] = int(t), 0  # the server's own facts, never a handler's
        ctx["two_person"] = action in self.two_person
        if held is not None:
            d = held
        elif ident.trust_domain != self.trust_domain:  # the middleware refused it already: never reached
            d = Decision(False, (), f"identity {ident.uri} is not of trust domain {self.trust_domain}")
        else:
            d = engine.decide(Request(principal, action, resource, ctx))
        if not d.allowed and isinstance(ctx.get("mfa_error"), str) and ctx["mfa_error"]:
            d = Decision(False, d.policies, f"{d.reason} ({ctx['mfa_error']})", d.exception, d.expired, d.break_glass)
        self.sink.emit(AuditEvent(operation, key, audit_result(d), actor=ident.uri, time=t, source=source))
        for exc in d.expired:
            log.warning("exception %s has expired: %s by %s is no longer excepted", exc, key, ident.uri)
            expired = AuditEvent("exception-expired", key, f"expired:{exc}", actor=ident.uri, time=t, source=source)
            self.sink.emit(expired)
        env = resource.attrs.get("env")
        used = [b for b in principal.bindings if env is None or b.env == env]
        with contextlib.suppress(Exception):  # counted here only; a metric never fails a decision
            if (
                not d.allowed
                and held is None
                and any(not b.active(t) and env in (None, b.env) for b in self._matching(ident.uri))
            ):
                EXPIRED_CREDENTIALS.labels(kind="grant").inc()  # a deny where an expired binding would have counted
        if d.allowed and d.break_glass:
            glass = ",".join(b.id for b in used if b.kind == "break-glass")
            log.warning("BREAK-GLASS use by %s: %s (bindings %s)", ident.uri, key, glass)
            self.sink.emit(AuditEvent("break-glass-use", key, f"allow:{glass}", actor=ident.uri, time=t, source=source))
        infos = engine.policies.policies  # last use: only the bindings of a role whose permit allowed this
        roles = {infos[i].annotations.get("role") for i in d.policies if i in infos} if d.allowed else set()
        if d.allowed and (touched := [b.id for b in used if b.role in roles]):
            try:
                self.store.touch(touched, t)
            except ModelsealError as e:  # a last-use stamp lost changes no decision
                log.error("cannot record the last use of bindings of %s: %s", ident.uri, e)
        return d

    async def authorize(
        self, request: web.Request, action: str, resource: Resource, context: Mapping[str, object] | None = None
    ) -> Decision:
        """The allowing ``Decision`` of ``action`` on ``resource`` by the request's identity,
        or a ``Refusal`` raised: 403, 429 (too many denials), 503 (see the module docstring)."""
        ident = request[IDENTITY]  # the middleware refused otherwise
        wait = self.limiter.retry_after(ident.uri, time.monotonic())
        if wait:
            raise Refusal(
                429, "TOOMANYREQUESTS", f"too many denied requests: retry after {wait} s", {"Retry-After": str(wait)}
            )
        ctx = {**(context or {}), "tls_version": tls_version(request)}  # the connection's, never a handler's
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="authz")
        loop = asyncio.get_running_loop()
        try:
            source = request_source(request)
            d = await loop.run_in_executor(self._pool, self.decide, ident, action, resource, ctx, source)
        except ModelsealError as e:  # GovernanceError, or the audit log refusing the event
            log.error("no decision for %s on %s: %s", ident.uri, resource_key(action, resource), e)
            reason = str(e) if str(e) == TAMPERED else "authorization is unavailable; retry later"
            raise Refusal(503, "UNAVAILABLE", reason) from None
        if not d.allowed:
            self.limiter.denied(ident.uri, time.monotonic())
            log.info("denied %s %s: %s", ident.uri, resource_key(action, resource), d.reason)
            raise Refusal(403, "DENIED", d.reason or f"{action} is not allowed")
        return d

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


AUTHZ: web.AppKey[Authz] = web.AppKey("authz", Authz)


async def authorize(
    request: web.Request, action: str, resource: Resource, context: Mapping[str, object] | None = None
) -> Decision:
    """``Authz.authorize`` of the application's decider; a server without one refuses (503)."""
    authz = request.app.get(AUTHZ)
    if authz is None:
        raise Refusal(503, "UNAVAILABLE", "this server has no authorization configured")
    return await authz.authorize(request, action, resource, context)


def install(app: web.Application, authz: Authz) -> None:
    """Put ``authz`` on ``app`` (``AUTHZ``); its threads stop with the application."""
    app[AUTHZ] = authz

    async def stop(app: web.Application) -> None:
        app[AUTHZ].close()

    app.on_cleanup.append(stop)


__all__ = [
    "AUTHZ",
    "CACHE_SECONDS",
    "DENIAL_BURST",
    "DENIAL_WINDOW",
    "TAMPERED",
    "TWO_PERSON_CONFIGURED",
    "Authz",
    "DenialLimiter",
    "FixedPolicy",
    "PolicySource",
    "Refusal",
    "audit_result",
    "authorize",
    "install",
    "request_source",
    "resource_key",
    "tls_version",
]
