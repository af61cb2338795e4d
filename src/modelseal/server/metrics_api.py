"""``GET /metrics`` on ``modelseal serve``, the handshake counter, and the background pass
(docs/monitoring.md, docs/serve.md "Metrics").

``install`` puts on the application: the metrics handshake observer (``count_handshake``,
first of ``server.handshakes.OBSERVERS``: completed handshakes by version and cipher,
failures and certificate refusals by reason, an expired certificate also as an expired
credential); the route ``GET /metrics``, decided like every other route
(``server.authz.authorize``: action ``metrics.read`` on ``Resource("Audit", "metrics",
{"env": <server env>})``, which the shipped policy permits to role ``metrics``) and
answering the Prometheus text format of every worker's figures (``telemetry.collect``);
and, in one worker only (``lead``: the runner's worker 0, or the only process), the
periodic pass of ``telemetry.statepass`` in a thread of its own. Label values are
bounded here too: a version or cipher name that is not an OpenSSL-style token is
``other``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from modelseal.governance.brokerkeys import BrokerKeys
from modelseal.governance.model import Resource
from modelseal.keys.service import KeyService
from modelseal.registry.service import Registry
from modelseal.server import authz
from modelseal.server.handshakes import OBSERVERS, REASONS, Handshake
from modelseal.server.identity import IDENTITY
from modelseal.telemetry import feed, metrics
from modelseal.telemetry.collect import ScrapeCollector, exposition
from modelseal.telemetry.statepass import Sources, StatePass, intervals

log = logging.getLogger("modelseal.server")

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TLS_VERSIONS = ("TLSv1.3", "TLSv1.2", "TLSv1.1", "TLSv1", "SSLv3")
COLLECTOR: web.AppKey[ScrapeCollector] = web.AppKey("metrics_collector", ScrapeCollector)
_leader = True  # this process runs the background pass (the runner says which worker does)


def lead(yes: bool) -> None:
    """Whether this process runs the background pass (``server.runner``: worker 0 only)."""
    global _leader
    _leader = yes


def count_handshake(h: Handshake) -> None:
    """The metrics observer: cheap, bounded labels, never raises (``handshakes.notify``)."""
    if h.ok:
        version = h.version if h.version in TLS_VERSIONS else "other"
        cipher = h.cipher if _TOKEN.fullmatch(h.cipher) else "other"
        metrics.TLS_HANDSHAKES.labels(version=version, cipher=cipher).inc()
        return
    reason = h.reason if h.reason in REASONS else "other"
    metrics.TLS_FAILURES.labels(reason=reason).inc()
    if reason == "expired":
        metrics.EXPIRED_CREDENTIALS.labels(kind="certificate").inc()


@dataclass(frozen=True)
class MetricsSetup:
    """What the metrics of one server read: ``tls_dir`` (its ``cert.pem``: role server,
    ``ca.pem``: role ca), ``home`` (config.toml: trust policy, ``[monitor]``; None:
    ``$MODELSEAL_HOME``), ``every`` (the pass's intervals; None: ``[monitor]``)."""

    tls_dir: Path | None = None
    home: Path | None = None
    every: dict[str, float] | None = None


def server_roles(tls_dir: Path | None) -> dict[str, list[Path]]:
    if tls_dir is None:
        return {}
    return {"server": [tls_dir / "cert.pem"], "ca": [tls_dir / "ca.pem"]}


async def get_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the figures, for an identity the policy lets ``metrics.read``."""
    assert IDENTITY in request  # the middleware refused otherwise
    decider = request.app.get(authz.AUTHZ)
    env = decider.env if decider is not None else ""
    await authz.authorize(request, "metrics.read", Resource("Audit", "metrics", {"env": env}))
    collector = request.app[COLLECTOR]
    body, content_type = await asyncio.get_running_loop().run_in_executor(None, exposition, collector)
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def _background(make: Callable[[], StatePass]) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        loop = asyncio.get_running_loop()

        async def cycle() -> None:
            state: StatePass | None = None
            while True:
                try:
                    if state is None:
                        state = await loop.run_in_executor(pool, make)
                    wait = await loop.run_in_executor(pool, state.run_due)
                except Exception as e:  # the pass logs its own parts; this is a bug's last guard
                    log.error("metrics pass failed: %s", type(e).__name__)
                    wait = 60.0
                await asyncio.sleep(wait)

        task = asyncio.create_task(cycle())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pool.shutdown(wait=False, cancel_futures=True)

    return run


class _Governance(Protocol):
    target: str
    svc: KeyService | None
    catalog: BrokerKeys | None

    @property
    def audit(self) -> Any: ...


def sources(registry: Registry | None, gov: _Governance | None) -> Sources:
    """What the background pass of a server reads: its registry, key service, broker
    catalog, governance database (holds) and audit log (``server.app.Governance``)."""
    if gov is None:
        return Sources(registry=registry)
    catalog = gov.catalog

    def entries() -> list[tuple[str, str]]:
        return [(k.name, k.backing) for k in catalog.all() if k.destroyed is None] if catalog else []

    audit = getattr(gov.audit, "sink", gov.audit)  # the AuditWriter's sink: the log itself
    return Sources(svc=gov.svc, catalog=entries, holds_target=gov.target, audit=audit, registry=registry)


def install(app: web.Application, setup: MetricsSetup | None, sources: Callable[[], Sources] | None) -> None:
    """The observer, ``GET /metrics`` and (``setup`` given, in the leading process) the
    background pass over ``sources()`` (called in the pass's thread, once)."""
    observers = app.get(OBSERVERS)
    if observers is None:
        observers = app[OBSERVERS] = []
    observers.insert(0, count_handshake)
    feed.install_hooks()
    setup = setup or MetricsSetup()
    app[COLLECTOR] = ScrapeCollector(server_roles(setup.tls_dir), setup.home)
    app.router.add_get("/metrics", get_metrics)
    if sources is None or not _leader:
        return
    every = setup.every

    def make() -> StatePass:
        return StatePass(sources(), metrics.multiprocess_dir(), every if every is not None else intervals())

    app.cleanup_ctx.append(_background(make))


__all__ = [
    "COLLECTOR",
    "MetricsSetup",
    "count_handshake",
    "get_metrics",
    "install",
    "lead",
    "server_roles",
    "sources",
]
