"""``modelseal serve``'s process model: one listening TLS 1.3 mutual-TLS socket, bound by
the parent and shared by N forked workers (default: one per core), each running the
aiohttp application on its own event loop. There is no plaintext listener but one, if
asked: ``--metrics-listen``, plain-HTTP ``GET /metrics`` on a loopback address only, served
by the parent (``server.metrics_listen``).

The parent (``server.workers``) supervises, watches ``--tls-dir`` and renews the server
certificate (``server.renewal``); a worker builds its own application (``build`` is called
after the fork: the application's database connections are the worker's), accepts through
``server.hygiene.Listener`` and handles SIGTERM (stop accepting, finish open requests,
bounded) and SIGHUP (reload the whole TLS context, ``tls.LiveContext``). The workers count
metrics into the run's multi-process directory, which the parent makes before any fork
(``metrics_listen.MultiprocDir``); worker 0 runs the metrics' background pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from modelseal.errors import CertificateError, ModelsealError
from modelseal.server import metrics_api, renewal, tls
from modelseal.server.handshakes import OBSERVERS, Observer
from modelseal.server.hygiene import Limits, Listener
from modelseal.server.identity import Authorizer
from modelseal.server.metrics_api import server_roles
from modelseal.server.metrics_listen import MetricsListener, MultiprocDir
from modelseal.server.metrics_listen import loopback as metrics_loopback
from modelseal.server.workers import Supervisor
from modelseal.telemetry import metrics
from modelseal.telemetry.collect import ScrapeCollector

log = logging.getLogger("modelseal.server")

SHUTDOWN_GRACE = Limits.shutdown_grace
BACKLOG = 1024
RENEWAL_MODES = ("auto", "local", "watch")
AppFactory = Callable[[Authorizer], web.Application]


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen takes HOST:PORT, got {text[:80]!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Listen(host, int(port))


def authorizer_for(tls_dir: Path, env: str | None, ca_folder: Path | None = None) -> Authorizer:
    """The server's trust domain is its own certificate's; its environment is ``env`` or,
    if None, its own certificate's. A server certificate of another environment than
    ``env`` is refused at start."""
    own = tls.own_identity(tls_dir)
    if env is not None and env != own.env:
        raise CertificateError(f"the server certificate is of environment {own.env!r}, not --env {env!r}")
    return Authorizer.for_server(own.trust_domain, own.env, ca_folder)


def bind(listen: Listen, backlog: int = BACKLOG) -> socket.socket:
    """The listening socket every worker accepts from (inherited over fork)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ModelsealError(f"cannot listen on {listen.host}:{listen.port}: {e.strerror}") from None
    return sock


@dataclass(frozen=True)
class _WorkerSpec:
    sock: socket.socket
    tls_dir: Path
    build: AppFactory
    env: str | None
    ca_folder: Path | None
    limits: Limits
    parent: int
    console: bool = False

    def __call__(self, index: int, ready_fd: int) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent takes SIGINT and sends SIGTERM
        metrics_api.lead(index == 0)  # one worker runs the metrics' background pass
        metrics.worker(index)  # its index's metrics files (a replacement goes on from their totals)
        live = tls.LiveContext(self.tls_dir, client_cert_optional=self.console)
        app = self.build(authorizer_for(self.tls_dir, self.env, self.ca_folder))
        asyncio.run(_run_worker(self, index, live, app, ready_fd))
        return 0


async def _run_worker(spec: _WorkerSpec, index: int, live: tls.LiveContext, app: web.Application, ready: int) -> None:
    limits = spec.limits
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=limits.shutdown_grace)
    await runner.setup()
    assert runner.server is not None
    observers: list[Observer] = app.get(OBSERVERS, [])  # the application's (server.app: metrics first)
    listener = Listener(spec.sock, live, runner.server, limits, observers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        try:
            live.reload()
            log.info("worker %d reloaded %s", index, spec.tls_dir)
        except CertificateError as e:
            log.error("worker %d: reload refused, keeping the old certificate: %s", index, e)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
    try:
        listener.start()
        os.write(ready, b"R")
        os.close(ready)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if os.getppid() != spec.parent:
                log.error("worker %d: the parent process is gone; stopping", index)
                break
    finally:
        await listener.stop()
        await runner.cleanup()
        log.info("worker %d stopped after %d connections", index, listener.accepted)


def serve(
    listen: Listen,
    tls_dir: Path,
    build: AppFactory,
    env: str | None = None,
    ca_folder: Path | None = None,
    *,
    workers: int | None = None,
    limits: Limits | None = None,
    renew: str = "auto",
    metrics_listen: Listen | None = None,
    data: Path | None = None,
    console: bool = False,
) -> None:
    """Run the application ``build(authorizer)`` in ``workers`` processes (default: one per
    core) until SIGTERM/SIGINT; returns after a clean shutdown.

    ``renew``: ``auto`` renews the server certificate through the local CA when it can
    (``renewal.local_ca``) and otherwise waits for ``--tls-dir`` to be renewed; ``local``
    requires the local CA (refused at start otherwise); ``watch`` never renews itself.
    ``metrics_listen``: a loopback address for plain-HTTP ``GET /metrics`` in this parent
    process (``server.metrics_listen``; anything else is refused at start). ``data``: the
    data folder, whose ``metrics-run`` holds the run's metrics directory unless systemd
    gives a ``$RUNTIME_DIRECTORY`` (``metrics_listen.metrics_root``). ``console``: the web
    console is on (``server.console``), so the listener asks for a client certificate
    without requiring one (``tls.server_context``); only ``/ui`` answers without one."""
    if renew not in RENEWAL_MODES:
        raise ValueError(f"renew takes one of {', '.join(RENEWAL_MODES)}, got {renew[:40]!r}")
    count = workers if workers is not None else (os.cpu_count() or 1)
    if not 1 <= count <= 256:
        raise ValueError(f"--workers takes 1 to 256, got {count}")
    limits = limits or Limits()
    authorizer_for(tls_dir, env, ca_folder)  # refuse a wrong environment before any fork
    tls.server_context(tls_dir)  # and a folder that does not load
    logging.basicConfig(level=logging.INFO, format="modelseal serve[%(process)d]: %(message)s", stream=sys.stderr)
    renewer_ca, why = renewal.local_ca(tls_dir, ca_folder) if renew != "watch" else (None, "renew=watch")
    if renew == "local" and renewer_ca is None:
        raise CertificateError(f"cannot renew the server certificate here: {why}")
    watch = renewal.FolderWatch(tls_dir)
    renewer = renewal.Renewer(tls_dir, renewer_ca)
    if metrics_listen is not None:
        metrics_loopback(metrics_listen.host)  # a non-loopback address is refused before anything is bound
    sock = bind(listen)

    def tick(sup: Supervisor) -> None:
        if watch.changed():
            log.warning("%s changed; the workers reload it", tls_dir)
            sup.signal_workers(signal.SIGHUP)
        renewer.tick(sup)

    spec = _WorkerSpec(sock, tls_dir, build, env, ca_folder, limits, os.getpid(), console)
    mpdir = MultiprocDir(data)  # before any fork: every worker counts into it
    scrape: MetricsListener | None = None
    try:
        if metrics_listen is not None:
            scrape = MetricsListener(metrics_listen.host, metrics_listen.port, ScrapeCollector(server_roles(tls_dir)))
            os.register_at_fork(after_in_child=scrape.close_in_child)  # no child holds the parent's listener
        sup = Supervisor(
            count,
            spec,
            limits.shutdown_grace,
            tick=tick,
            on_hup=lambda: setattr(watch, "last", renewal.stamp(tls_dir)),
            poll=scrape.poll if scrape is not None else None,
        )
        sup.on_exit = lambda pid: mpdir.process_gone(sup.index_of(pid), pid)
        renewing = f"through {why}" if renewer_ca else f"watching {tls_dir} ({why})"
        print(
            f"modelseal serve: listening on {listen.host}:{listen.port} (TLS 1.3, mutual; {count} workers; "
            + (f"web console on https://{listen.host}:{listen.port}/ui/; " if console else "")
            + f"certificate renewal: {renewing})"
            + (f"; metrics on http://{scrape.address}/metrics (this host only)" if scrape is not None else ""),
            file=sys.stderr,
        )
        with contextlib.suppress(KeyboardInterrupt):  # SIGINT/SIGTERM while the workers started: stopped
            sup.run()
    finally:
        sock.close()
        if scrape is not None:
            scrape.close()
        mpdir.close()


__all__ = ["RENEWAL_MODES", "SHUTDOWN_GRACE", "AppFactory", "Listen", "authorizer_for", "bind", "parse_listen", "serve"]
