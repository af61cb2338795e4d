"""The ``modelseal evidence`` commands (docs/evidence.md): ``evidence export`` writes the signed
compliance bundle (JSON and a self-contained HTML report), ``evidence verify`` checks one.
Thin: ``modelseal.evidence`` does the work.

``export`` reads this host: ``$MODELSEAL_HOME`` (keys, CA, records), the audit log
(``MODELSEAL_AUDIT_URL`` or ``audit.db``), the governance database of ``modelseal serve``
(``--data DIR`` / ``--governance-db URL``, as ``serve`` takes them). ``--tls tls://HOST:PORT``
scans an endpoint here (``telemetry.scan``, as ``modelseal scan`` does) and hands the report
in; ``--tls-report FILE`` takes a saved ``modelseal scan --json``. ``verify`` prints one line per
problem and exits 28 (``EvidenceTampered``); the key comes from ``--signer-key`` or this
host's audit keys, never from the bundle; ``--from``/``--to`` require the window it covers,
and its summary line names the window, host and generation time the signed manifest gives.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from modelseal.cli.common import escape
from modelseal.errors import EvidenceError, EvidenceTampered
from modelseal.keys.service import KeyService
from modelseal.util.home import modelseal_home


def _audit_target(home: Path) -> str | Path:
    return os.environ.get("MODELSEAL_AUDIT_URL") or home / "audit.db"


def _scan(targets: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    from modelseal.evidence.records import parse_tls_report
    from modelseal.telemetry.scan import ScanOptions, scan, scan_table

    out = []
    for target in targets:
        if not target.startswith("tls://"):
            raise EvidenceError(f"--tls takes tls://HOST:PORT, got {target[:80]!r}")
        opts = ScanOptions(
            tls_dir=Path(args.tls_dir) if args.tls_dir else None, pins=list(args.pin), table=scan_table()
        )
        report = scan([target], opts)
        data = json.dumps(report.to_json(), sort_keys=True).encode()
        out.append(parse_tls_report(data, "scanned at export"))
    return out


def cmd_export(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.evidence.bundle import Sources, export
    from modelseal.evidence.model import Window
    from modelseal.evidence.records import read_tls_report
    from modelseal.governance.store import open_target

    window = Window.parse(args.start, args.end)
    home = modelseal_home()
    data = Path(args.data) if args.data else home / "registry"  # serve's default --data
    try:
        governance = open_target(data, args.governance_db)
    except ValueError as e:
        raise EvidenceError(str(e).replace("--db", "--governance-db")) from None
    reports = [read_tls_report(Path(f)) for f in args.tls_report] + _scan(list(args.tls), args)
    src = Sources(
        home=home,
        audit=_audit_target(home),
        governance=governance,
        tls_reports=tuple(reports),
        witness=Path(args.witness) if args.witness else None,
    )
    done = export(Path(args.out), window, src, svc)
    print(
        f"wrote {done.files} files and the signed manifest to {escape(done.folder)}"
        f" ({done.proofs} audit events cited with inclusion proofs)"
    )
    if not done.audit_ok:
        print(f"modelseal: warning: the audit log does NOT verify: {escape(done.audit_reason)}", file=sys.stderr)
    if done.without_evidence:
        print(f"no evidence in the window for: {', '.join(done.without_evidence)}")
    if done.unverified:
        print(f"only failing or unverified entries for: {', '.join(done.unverified)}")
    for gap in done.gaps:
        print(f"gap: {escape(gap)}")
    return 0


def cmd_verify(args: argparse.Namespace, svc: KeyService) -> int:
    del svc  # no key service: a bundle is checked with public keys only
    from modelseal.evidence.model import Window, utc
    from modelseal.evidence.verify import check, trusted_keys

    if (args.start is None) != (args.end is None):
        raise EvidenceError("give --from and --to together, or neither")
    window = Window.parse(args.start, args.end) if args.start is not None else None
    trusted = trusted_keys(list(args.signer_key), _audit_target(modelseal_home()))
    result = check(Path(args.dir), trusted, window)
    for line in result.problems:
        print(f"modelseal: {escape(line, backslash=False)}", file=sys.stderr)
    if result.problems:
        raise EvidenceTampered(f"the evidence bundle does NOT verify: {len(result.problems)} problem(s)")
    start, end = result.window or ("?", "?")
    print(
        f"evidence bundle verifies: window {escape(start)} to {escape(end)} (end excluded), host "
        f"{escape(result.host)}, generated {utc(result.generated)}; {result.files} files, signed by audit key "
        f"{result.signer}; {result.proofs} inclusion proofs against the signed tree head of {result.tree_size or 0} "
        "entries"
    )
    return 0


def add_evidence(sub: Any) -> None:
    p = sub.add_parser("evidence", help="the signed compliance evidence bundle: export, verify (docs/evidence.md)")
    esub = p.add_subparsers(dest="evidence_cmd", required=True)
    x = esub.add_parser(
        "export",
        help="write the signed evidence bundle of a window into a new folder",
        description="Gather the key inventory, certificates, access, changes, TLS scans, backup and drill records "
        "and the audit log's proof for a window; index them against SOC 2, ISO 27001, PCI DSS and NIST SP 800-57; "
        "write JSON and report.html, signed with the host audit key.",
    )
    x.add_argument("--from", dest="start", required=True, metavar="DATE", help="2026-01-01, or ISO 8601 with offset")
    x.add_argument("--to", dest="end", required=True, metavar="DATE", help="a date (included) or an ISO 8601 time")
    x.add_argument("--out", required=True, metavar="DIR", help="the bundle's folder (must not exist)")
    x.add_argument("--data", metavar="DIR", help="the server's --data (default: $MODELSEAL_HOME/registry)")
    x.add_argument("--governance-db", metavar="URL", help="the server's --db: postgresql://... or sqlite:///PATH")
    x.add_argument("--tls", action="append", default=[], metavar="tls://HOST:PORT", help="scan this endpoint")
    x.add_argument("--tls-report", action="append", default=[], metavar="FILE", help="a modelseal scan --json")
    x.add_argument("--tls-dir", metavar="DIR", help="client certificate folder for --tls")
    x.add_argument("--pin", action="append", default=[], metavar="PIN", help="a pin of the issuing CA for --tls")
    x.add_argument("--witness", metavar="DIR", help="also verify the audit log against this witness's checkpoint")
    x.set_defaults(fn=cmd_export)
    v = esub.add_parser(
        "verify",
        help="check a bundle: signature, every file, the audit proofs",
        description="Check the manifest's signature, that no file was edited, deleted, added or reordered, and "
        "every inclusion proof against the signed tree head. One line per problem; exit 28 on any.",
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument(
        "--signer-key",
        action="append",
        default=[],
        metavar="HEX",
        help="the exporting host's audit key (default: this host's audit keys)",
    )
    v.add_argument("--from", dest="start", metavar="DATE", help="require the bundle to cover this window (with --to)")
    v.add_argument("--to", dest="end", metavar="DATE", help="the window's last day (included), or an ISO 8601 time")
    v.set_defaults(fn=cmd_verify)


__all__ = ["add_evidence"]
