"""The ``modelseal scan`` command: find what is still unprotected (docs/scan.md).

Thin: parse, call ``telemetry.scan``, print one line per finding and a summary (or one JSON
document), optionally write the node_exporter textfile, then exit: 19 (``ScanFindings``) when
the findings are more than ``--fail-on``; else, for an incomplete scan without
``--allow-errors``, the code of the first target that failed as a whole (7, 13, 15...), or 22
(``ScanIncomplete``) when only files, objects, layers or probes could not be read. The report
and the textfile are written in every case. Everything printed was read from storage or a
server and is escaped by the report.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from modelseal.errors import ScanFindings, ScanIncomplete
from modelseal.keys.service import KeyService
from modelseal.util.home import modelseal_home


def cmd_scan(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.recipes.context import TRUST_ENV, trust_policy
    from modelseal.signing.trust import TrustPolicy, load_policy
    from modelseal.telemetry import scankeys
    from modelseal.telemetry.scan import ScanOptions, scan, scan_table
    from modelseal.telemetry.scanoutput import write_textfile

    if args.fail_on < 0:
        raise ValueError("--fail-on takes a number of findings, 0 or more")
    # A host without $MODELSEAL_HOME (a CI runner) scans without config.toml: no configured
    # trust policy (--trust or MODELSEAL_TRUST still apply), key version states unknown.
    home = modelseal_home().is_dir()
    policy: TrustPolicy | None = None
    if args.trust:
        policy = load_policy(args.trust)
    elif home:
        policy = trust_policy(svc)
    else:
        env_policy = os.environ.get(TRUST_ENV)
        if env_policy:
            policy = load_policy(env_policy)
    keys = scankeys.scan_service(svc) if home else None
    opts = ScanOptions(
        policy=policy,
        svc=keys,
        tls_dir=Path(args.tls_dir) if args.tls_dir else None,
        pins=list(args.pin),
        table=scan_table(),
    )
    report = scan(list(args.target), opts)
    if keys is None:
        report.note("no $MODELSEAL_HOME: key version states unknown")
    if args.textfile:
        write_textfile(report, Path(args.textfile))
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))  # ensure_ascii: controls escaped
    else:
        for line in report.lines():
            print(line)
    if report.finding_count > args.fail_on:
        raise ScanFindings(f"{report.finding_count} findings, more than --fail-on {args.fail_on}")
    if report.incomplete and not args.allow_errors:
        if report.failed:
            raise report.failed[0]
        raise ScanIncomplete(f"the scan is incomplete: {report.error_count} unreadable (--allow-errors to accept)")
    return 0


def add_scan(sub: Any) -> None:
    p = sub.add_parser(
        "scan",
        help="find plaintext models, unsigned or revoked artifacts, weak TLS (docs/scan.md)",
        description="Scan local paths, s3://BUCKET/PREFIX, oci://HOST[:PORT]/REPO or tls://HOST:PORT by "
        "content, reading headers only. One line per finding and a summary; exit 19 when the findings "
        "are more than --fail-on, 22 when something could not be read (unless --allow-errors).",
    )
    p.add_argument("target", nargs="+", metavar="TARGET", help="PATH, s3://..., oci://... or tls://HOST:PORT")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    p.add_argument(
        "--fail-on", type=int, default=0, metavar="N", help="exit 19 when there are more than N findings (default 0)"
    )
    p.add_argument(
        "--allow-errors",
        action="store_true",
        help="exit 0 (or 19) even when something could not be read (default: exit 22, or the failed target's code)",
    )
    p.add_argument("--textfile", metavar="PATH", help="also write the figures for node_exporter's textfile collector")
    p.add_argument("--trust", metavar="POLICY", help="the trust policy to judge signatures under (default: in force)")
    p.add_argument("--tls-dir", metavar="DIR", help="client cert.pem, key.pem, ca.pem for oci:// and tls://")
    p.add_argument(
        "--pin", action="append", default=[], metavar="PIN", help="a pin of the issuing CA for oci:// and tls://"
    )
    p.set_defaults(fn=cmd_scan)


__all__ = ["add_scan"]
