"""The ``modelseal serve`` command: parse the flags, open the registry, hand over to
``server.runner.serve``.

Thin: the TLS folder, listen address, data folder and store URLs are the operator's; no
flag value reaches a certificate check except as configuration of this process. The
registry and the governance state (bindings, policy versions, the broker's key catalog, on
``--db`` or ``DATA/governance.db``) are opened by the ``build`` closure, so each process
that builds the application opens its own database connections. Every decision is audited
to the server's audit log (``KeyService.sink``), whose ``KeyService`` is also the broker's.
The anomaly monitor's settings (``[monitor]``) are checked before listening too; every
worker runs the monitor under its lease (``server.monitor_task``). ``--console`` (or
``[console] enabled``) mounts the web console (``server.console``, docs/console.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelseal.keys.service import KeyService

if TYPE_CHECKING:
    from aiohttp import web

    from modelseal.server.identity import Authorizer

# The defaults are stated here so that building the parser does not import aiohttp (every
# modelseal command builds it); tests/test_registry_serve_cli.py checks them against the
# server's own constants.
CONTENT_POLICIES = ("sealed-only", "any")
RENEWAL_MODES = ("auto", "local", "watch")
GC_INTERVAL = 60.0
GC_GRACE = 86400.0
BODY_TIMEOUT = 30.0


def default_data() -> Path:
    """``$MODELSEAL_HOME/registry`` when MODELSEAL_HOME is set, else ``./modelseal-data``."""
    home = os.environ.get("MODELSEAL_HOME")
    return Path(home) / "registry" if home else Path("modelseal-data")


def cmd_serve(args: argparse.Namespace, svc: KeyService) -> int:
    # The registry stores ciphertext only and holds no key; svc is used only by
    # --issue-certificates (the CA's key, unwrapped in each worker that signs a renewal).
    from modelseal.governance.store import open_target
    from modelseal.pki import issue
    from modelseal.registry.service import Limits, open_registry
    from modelseal.server import app, runner

    listen = runner.parse_listen(args.listen)
    data = Path(args.data) if args.data else default_data()
    grace = float(args.gc_grace)
    limits = Limits(link_grace=grace, blob_grace=min(grace, Limits.blob_grace), upload_ttl=max(grace, 60.0))
    open_registry(data, args.db, args.blobs, args.content, limits).close()  # refuse a bad store before listening
    target = open_target(data, args.db)
    app.check_governance(target)
    if args.issue_certificates:
        issue.load_issuer(svc)  # refuse a missing or unreadable CA before listening
    from modelseal.server.metrics_api import MetricsSetup
    from modelseal.telemetry.statepass import intervals

    try:
        metrics_listen = runner.parse_listen(args.metrics_listen) if args.metrics_listen else None
    except ValueError:
        raise ValueError(f"--metrics-listen takes HOST:PORT, got {args.metrics_listen[:80]!r}") from None
    metrics = MetricsSetup(Path(args.tls_dir), every=intervals())  # a bad [monitor] is refused before listening
    from modelseal.server.monitor_task import MonitorSetup
    from modelseal.telemetry import monitorconfig
    from modelseal.telemetry.detectstate import DetectState

    monitor = MonitorSetup(monitorconfig.load())  # the anomaly detectors' settings, refused before listening too
    from modelseal.server.console_sessions import load_settings as console_settings

    enabled, console_conf = console_settings()  # [console]: a bad table is refused before listening
    console = console_conf if (args.console or enabled) else None
    DetectState.open(target).close()  # its tables, made once before the workers start

    def build(auth: Authorizer) -> web.Application:
        registry = open_registry(data, args.db, args.blobs, args.content, limits)
        issuer = issue.load_issuer(svc) if args.issue_certificates else None
        gov = app.open_governance(target, auth, svc.sink, svc)
        return app.make_app(
            auth, registry, float(args.gc_interval), float(args.body_timeout), issuer, gov, metrics, monitor, console
        )

    runner.serve(
        listen,
        Path(args.tls_dir),
        build,
        args.env,
        workers=args.workers,
        renew=args.renew,
        metrics_listen=metrics_listen,
        data=data,  # the metrics directory's folder (unless $RUNTIME_DIRECTORY)
        console=console is not None,
    )
    return 0


def add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the mutual-TLS OCI registry server (docs/serve.md, docs/registry.md)",
        description="Serve the OCI distribution API over TLS 1.3 with a required client certificate "
        "of this CA. SIGHUP reloads the server certificate; SIGTERM/SIGINT stop cleanly.",
    )
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on, e.g. 127.0.0.1:5000")
    p.add_argument(
        "--tls-dir", required=True, metavar="DIR", help="the server's cert.pem, key.pem, ca.pem (modelseal cert issue)"
    )
    p.add_argument(
        "--env",
        metavar="ENV",
        help="the environment served (default: the server certificate's); callers of another one get 403",
    )
    p.add_argument(
        "--data", metavar="DIR", help="the registry's database and blobs (default: $MODELSEAL_HOME/registry)"
    )
    p.add_argument(
        "--content",
        choices=CONTENT_POLICIES,
        default=CONTENT_POLICIES[0],
        help="sealed-only (default): only modelseal ciphertext and signatures; any: a general OCI registry",
    )
    p.add_argument("--db", metavar="URL", help="postgresql://... (default: SQLite under --data)")
    p.add_argument("--blobs", metavar="URL", help="s3://BUCKET/PREFIX or file:///PATH (default: a folder under --data)")
    p.add_argument("--gc-interval", type=float, default=GC_INTERVAL, metavar="S", help="seconds between GC passes")
    p.add_argument(
        "--gc-grace",
        type=float,
        default=GC_GRACE,
        metavar="S",
        help="seconds a pushed blob no manifest references is kept (default: one day)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT,
        metavar="S",
        help="seconds each MiB of a request body (or its rest) may take before it is refused (a minimum rate)",
    )
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: one per core)")
    p.add_argument(
        "--renew",
        choices=RENEWAL_MODES,
        default="auto",
        help="server certificate renewal: auto (the local CA if it can, else watch --tls-dir), local, watch",
    )
    p.add_argument(
        "--issue-certificates",
        action="store_true",
        help="serve POST /modelseal/v1/certificates/renew: callers renew their own certificate (same identity) "
        "through the CA of $MODELSEAL_HOME; the CA key is then used inside the workers (docs/pki.md)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve GET /metrics over plain HTTP on this loopback address (127.0.0.1:9464; "
        "refused unless loopback: docs/monitoring.md); GET /metrics over mutual TLS needs no flag",
    )
    p.add_argument(
        "--console",
        action="store_true",
        help="also serve the web console under /ui/ (or [console] enabled = true; docs/console.md): sign in "
        "with 'modelseal console login'; a connection without a client certificate then reaches /ui/ only",
    )
    p.set_defaults(fn=cmd_serve)


__all__ = ["add_serve"]
