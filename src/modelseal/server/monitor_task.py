"""The monitor inside ``modelseal serve`` (docs/monitoring.md, "Anomaly detection"; docs/serve.md).

``install`` puts two things on a worker's application, given the governance pieces:

- the ``NetEventRecorder`` (``telemetry.netevents``) as a handshake observer
  (``server.handshakes.OBSERVERS``): every failed handshake and certificate refusal of this
  worker goes to the shared ``netevents`` table;
- a background task that runs ``Monitor.run_once`` (``telemetry.monitor``) every
  ``[monitor] interval`` seconds in a thread of its own (a pass reads and verifies rows and
  writes the database: never on the event loop). Every worker of every instance runs it;
  the lease in the database lets one of them work, and another takes over within the lease
  (``[monitor] lease``, 30 s) when that one stops. A pass that found a full batch is
  followed at once by the next (catching up after a restart).

The monitor reads the server's audit log (the sink under the governance pieces, when it
is a ``MerkleAuditLog``), writes its anomaly and hold events to the governance audit writer,
places holds through the governance ``HoldStore`` in the server's environment, and sends
alerts to ``[monitor.alerts]`` and events to ``[monitor.export]``. On shutdown it gives the
lease up and the recorder writes what it queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from modelseal.governance.holds import HoldStore
from modelseal.keys.config import config_table
from modelseal.server.handshakes import OBSERVERS
from modelseal.telemetry.alerting import sinks_from_config
from modelseal.telemetry.detectstate import DetectState
from modelseal.telemetry.export import exporter_from_config
from modelseal.telemetry.monitor import Monitor
from modelseal.telemetry.monitorconfig import MonitorConfig
from modelseal.telemetry.netevents import NetEventRecorder

log = logging.getLogger("modelseal.server")

MONITOR: web.AppKey[Monitor] = web.AppKey("monitor", Monitor)


@dataclass(frozen=True)
class MonitorSetup:
    """What ``modelseal serve`` read before listening: ``config`` (``[monitor]``) and
    ``home`` (where config.toml and relative export paths are; None: ``$MODELSEAL_HOME``)."""

    config: MonitorConfig
    home: Path | None = None


class _Governance(Protocol):
    target: str
    holds: HoldStore | None

    @property
    def audit(self) -> Any: ...


def _followed_log(gov: _Governance) -> Any:
    """The audit log under the governance writer, if it can be followed (``AuditTail``)."""
    sink = getattr(gov.audit, "sink", None)
    return sink if hasattr(sink, "store") and hasattr(sink, "trusted_keys") else None


def build(setup: MonitorSetup, gov: _Governance, env: str, state: DetectState) -> Monitor:
    """The monitor of one worker over ``gov`` (module docstring)."""
    table = config_table("monitor", setup.home)
    alerts, export = table.get("alerts", {}), table.get("export", {})
    return Monitor(
        state,
        _followed_log(gov),
        setup.config,
        sinks=sinks_from_config(alerts if isinstance(alerts, dict) else {}, setup.home),
        exporter=exporter_from_config(export if isinstance(export, dict) else {}, setup.home),
        holds=gov.holds,
        audit_sink=gov.audit,
        env=env,
    )


def _loop(
    monitor: Monitor, recorder: NetEventRecorder, state: DetectState, interval: float
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor")
        loop = asyncio.get_running_loop()

        async def cycle() -> None:
            while True:
                wait = interval
                try:
                    result = await loop.run_in_executor(pool, monitor.run_once)
                    wait = 0.0 if result.more else interval
                except Exception as e:  # a pass logs its own parts; the next one retries
                    log.error("monitor pass failed: %s", type(e).__name__)
                await asyncio.sleep(wait)

        task = asyncio.create_task(cycle())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await loop.run_in_executor(pool, monitor.close)
        await loop.run_in_executor(pool, recorder.close)
        pool.shutdown(wait=False, cancel_futures=True)
        state.close()

    return run


def install(app: web.Application, setup: MonitorSetup, gov: _Governance, env: str) -> None:
    """The recorder and (when ``[monitor] enabled``) the monitor's task on ``app``."""
    state = DetectState.open(gov.target)
    recorder = NetEventRecorder(state)
    observers = app.get(OBSERVERS)
    if observers is None:
        observers = app[OBSERVERS] = []
    observers.append(recorder.record)
    if not setup.config.enabled:

        async def close(app: web.Application) -> None:
            await asyncio.get_running_loop().run_in_executor(None, recorder.close)
            state.close()

        app.on_cleanup.append(close)
        return
    monitor = build(setup, gov, env, state)
    app[MONITOR] = monitor
    app.cleanup_ctx.append(_loop(monitor, recorder, state, setup.config.interval))


__all__ = ["MONITOR", "MonitorSetup", "build", "install"]
