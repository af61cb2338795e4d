"""``modelseal serve``: the aiohttp application.

``make_app`` builds the application: the identity middleware (``server.identity``) in
front of every route, the OCI distribution base endpoint ``GET /v2/``, and, given a
registry, the OCI distribution routes (``server.oci``) and the online garbage collector
(``registry.gc``), a background task that runs one bounded pass every ``gc_interval``
seconds in the routes' thread pool and closes the registry when the application stops;
given an issuer, the renewal endpoint of ``server.certs_api``; given the governance pieces
(``Governance``: the bindings, the policy versions and the decider, opened by
``open_governance`` on the server's governance database), the decider ``server.authz`` that
every route but ``GET /v2/`` asks, and the governance APIs under ``/modelseal/v1/``: the key
broker (``server.keys_api``, with the server's ``KeyService``), access, approvals and MFA
(``server.gov_api``), policy versions (``server.policy_api``) and holds
(``server.holds_api``), and the anomaly alerts of the audit log (``server.alerts_api``).
Without them every decided route answers 503: there is no open mode.
Always ``GET /metrics`` and the handshake counter (``server.metrics_api``); every audit event
of the governance pieces also counts (``telemetry.feed.CountingSink``). With ``monitor`` and
the governance pieces, the anomaly monitor's task and handshake recorder (``server.monitor_task``).
With ``console`` settings, the web console under ``/ui`` (``server.console``, docs/console.md).
The listener that runs it is ``server.runner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from modelseal.audit.batch import BatchLog, GroupCommit
from modelseal.audit.events import AuditSink
from modelseal.governance.approvals import settings as approval_settings
from modelseal.governance.brokerkeys import BrokerKeys
from modelseal.governance.brokerkeys import load_config as broker_config
from modelseal.governance.holds import HoldIndex, HoldStore, backing_resolver
from modelseal.governance.store import GovStore
from modelseal.governance.versions import PolicyStore
from modelseal.keys.service import KeyService
from modelseal.pki.backend import Issuer
from modelseal.registry import gc
from modelseal.registry.service import Registry
from modelseal.server import (
    alerts_api,
    authz,
    certs_api,
    gov_api,
    holds_api,
    keys_api,
    metrics_api,
    monitor_task,
    oci,
    policy_api,
)
from modelseal.server.auditwriter import AuditWriter
from modelseal.server.console_sessions import ConsoleSettings
from modelseal.server.identity import IDENTITY, Authorizer, middleware
from modelseal.telemetry import feed

log = logging.getLogger("modelseal.server")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
MAX_BODY = 1 << 20  # request.read()/post() only; the OCI routes stream and bound their own bodies
GC_INTERVAL = 60.0
BODY_TIMEOUT = 30.0


async def base(request: web.Request) -> web.Response:
    """``GET /v2/``: the OCI base endpoint; 200 ``{}`` for an authorized identity."""
    assert IDENTITY in request  # the middleware refused otherwise
    return web.json_response({}, headers={API_VERSION_HEADER: API_VERSION})


async def _add_version_header(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2/"):
        response.headers.setdefault(API_VERSION_HEADER, API_VERSION)


def _collector(registry: Registry, interval: float) -> object:
    async def run(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await asyncio.get_running_loop().run_in_executor(app[oci.POOL], gc.collect, registry)
                except Exception as e:  # one failed pass stops nothing; the next one retries
                    log.error("gc pass failed: %s", type(e).__name__)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        registry.close()

    return run


@dataclass
class Governance:
    """One worker's governance pieces, all on one database ``target``: the bindings, the
    policy versions, the decider over both (its events written off the request path by
    ``audit``, ``server.auditwriter``), and the broker (its ``KeyService`` and key catalog;
    None: this server brokers no keys)."""

    target: str
    store: GovStore
    policies: PolicyStore
    authz: authz.Authz
    audit: AuditWriter
    svc: KeyService | None = None
    catalog: BrokerKeys | None = None
    holds: HoldStore | None = None  # the holds the decider enforces (governance.holds)

    def close(self) -> None:
        self.authz.close()
        self.audit.close()
        for db in (self.store, self.policies, self.catalog, self.holds):
            if db is not None:
                db.close()


def open_governance(target: str, auth: Authorizer, sink: AuditSink, svc: KeyService | None = None) -> Governance:
    """The governance pieces on ``target`` (``governance.store.open_target``), decisions
    audited to ``sink``; with ``svc``, the key broker over it (``[broker]`` of config.toml)."""
    store = GovStore.open(target)
    policies = PolicyStore.open(target)
    sink = feed.CountingSink(sink)  # each event also counts (no store lookup in the writer thread)
    writer = AuditWriter(sink)
    holds = HoldStore.open(target)
    index = HoldIndex(holds, env=auth.env)  # this environment's holds only (governance.holds)
    decider = authz.Authz(store, policies, auth.env, auth.trust_domain, writer, holds=index)
    if svc is not None and hasattr(sink, "emit_many"):
        # Key operations are recorded before they are answered; concurrent ones share a commit.
        svc = svc.with_sink(GroupCommit(cast(BatchLog, sink)))
    catalog = BrokerKeys.open(target, broker_config()) if svc is not None else None
    if catalog is not None:
        index.resolve = backing_resolver(catalog)  # a key hold holds every name of its backing key
    return Governance(target, store, policies, decider, writer, svc, catalog, holds)


def check_governance(target: str, broker: bool = True) -> None:
    """Refuse, before listening, a governance database that cannot be opened or a
    ``[governance]`` or ``[broker]`` table that does not parse."""
    GovStore.open(target).close()
    PolicyStore.open(target).close()
    HoldStore.open(target).close()
    approval_settings()  # [governance]: its two_person list, approvals, expiry
    if broker:
        broker_config()


def _mount_governance(app: web.Application, gov: Governance) -> None:
    authz.install(app, gov.authz)
    gov_api.add_routes(app, gov.store, gov.svc)
    policy_api.add_routes(app, gov.policies)
    if gov.holds is not None:
        holds_api.add_routes(app, gov.holds)
    if gov.svc is not None and gov.catalog is not None:
        keys_api.add_routes(app, gov.svc, gov.catalog)
    alerts_api.add_routes(app, getattr(gov.audit, "sink", gov.audit))  # the anomaly alerts of the audit log

    async def close(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, gov.audit.close)  # the queued events are written
        gov.store.close()
        gov.policies.close()
        if gov.holds is not None:
            gov.holds.close()

    app.on_cleanup.append(close)


def make_app(
    auth: Authorizer,
    registry: Registry | None = None,
    gc_interval: float = GC_INTERVAL,
    body_timeout: float = BODY_TIMEOUT,
    issuer: Issuer | None = None,
    governance: Governance | None = None,
    metrics: metrics_api.MetricsSetup | None = None,
    monitor: monitor_task.MonitorSetup | None = None,
    console: ConsoleSettings | None = None,
) -> web.Application:
    """The application: every request passes ``auth`` first; with ``registry``, the OCI API;
    with ``issuer``, ``POST /modelseal/v1/certificates/renew`` (``server.certs_api``); with
    ``governance``, the decider and the governance APIs (module docstring); with ``console``
    (and ``governance``, whose database keeps its sessions), the web console under ``/ui``
    (``server.console``), the one path a connection without a client certificate reaches."""
    if console is not None and governance is None:
        raise ValueError("the web console needs the governance pieces")
    app = web.Application(
        middlewares=[middleware(auth, "/ui" if console is not None else None)], client_max_size=MAX_BODY
    )
    app.router.add_get("/v2/", base)
    app.on_response_prepare.append(_add_version_header)
    if governance is not None:
        _mount_governance(app, governance)
    if registry is not None:
        oci.add_routes(app, registry, body_timeout)
        app.cleanup_ctx.append(_collector(registry, gc_interval))  # type: ignore[arg-type]
    if issuer is not None:
        certs_api.add_routes(app, issuer)
    # GET /metrics and the handshake counter always; with ``metrics``, the figures' background pass
    metrics_api.install(app, metrics, None if metrics is None else lambda: metrics_api.sources(registry, governance))
    if monitor is not None and governance is not None:  # the anomaly detectors, under a lease (server.monitor_task)
        monitor_task.install(app, monitor, governance, auth.env)
    if console is not None and governance is not None:
        from modelseal.server import console as console_mod  # Jinja2 and the pages: only when it is on

        console_mod.install(app, console, auth, governance, registry, issuer)
    return app


__all__ = ["API_VERSION", "API_VERSION_HEADER", "Governance", "check_governance", "make_app", "open_governance"]
