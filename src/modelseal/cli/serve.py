"""The ``modelseal serve`` command: parse the flags, hand over to ``server.app.serve``.

Thin: the TLS folder and listen address are the operator's; no flag value reaches a
certificate check except as configuration of this process.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modelseal.keys.service import KeyService
from modelseal.server import app, runner


def cmd_serve(args: argparse.Namespace, svc: KeyService) -> int:
    del svc  # the registry will use it; the base endpoint needs no key
    listen = runner.parse_listen(args.listen)
    runner.serve(listen, Path(args.tls_dir), app.make_app, args.env)
    return 0


def add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the mutual-TLS registry server (docs/serve.md)",
        description="Serve the OCI base endpoint GET /v2/ over TLS 1.3 with a required client certificate "
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
        "--data", metavar="DIR", help="accepted for later (the registry's database and blobs); unused for now"
    )
    p.set_defaults(fn=cmd_serve)


__all__ = ["add_serve"]
