"""``modelseal backup drill`` and ``modelseal backup restore`` (docs/recovery.md). Thin:
``modelseal.recovery`` does the work.

Secrets never come from argv: recovery and keystore shares, OpenBao unseal keys and tokens
are read from mode-600 files (``--recovery-shares FILE``, ``--keystore-shares FILE``,
``--bao-unseal-keys FILE``, ``--bao-token-file FILE``) or the environment
(``MODELSEAL_PASSPHRASE``, ``BAO_TOKEN``). ``backup drill`` prints its table and exits 25
(``DrillFailed``) on any failure, after the signed record is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modelseal.cli.common import escape
from modelseal.keys.service import KeyService
from modelseal.util.home import modelseal_home


def _duration(text: str) -> float:
    from modelseal.errors import BackupError
    from modelseal.recovery.drill import parse_duration

    try:
        return parse_duration(text, "the duration")
    except BackupError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sample(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("--sample takes a positive number of artifacts")
    return n


def cmd_drill(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.recovery.drill import DrillRequest, run_drill, table
    from modelseal.recovery.locations import Locations

    req = DrillRequest(
        source=args.source,
        backup_id=args.id,
        sample=args.sample,
        paths=tuple(Path(p) for p in args.path),
        recovery_shares=tuple(Path(p) for p in args.recovery_shares),
        keystore_shares=tuple(Path(p) for p in args.keystore_shares),
        bao_unseal_keys=Path(args.bao_unseal_keys) if args.bao_unseal_keys else None,
        bao_token_file=Path(args.bao_token_file) if args.bao_token_file else None,
        registry_blobs=args.registry_blobs,
        registry_data=Path(args.registry_data) if args.registry_data else None,
        rto=args.rto,
        rpo=args.rpo,
        signer_keys=tuple(args.signer_key),
        witness=Path(args.witness) if args.witness else None,
    )
    live = Locations.from_args(modelseal_home())
    report = run_drill(req, live, svc, svc.sink, check=False)
    if args.json:
        print(json.dumps({**report.to_json(), "record": str(report.record)}, indent=1, sort_keys=True))
    else:
        print(table(report))  # untrusted text in it is escaped by table()
    report.raise_if_failed()
    return 0


def cmd_restore(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.recovery.locations import Locations
    from modelseal.recovery.restore import RestoreRequest, run_restore

    loc = Locations.from_args(
        modelseal_home(),
        registry_data=args.data,
        registry_db=args.db,
        governance_db=args.governance_db,
        bao_addr=args.bao_addr,
        bao_token_file=args.bao_token_file,
    )
    req = RestoreRequest(
        source=args.source,
        backup_id=args.id,
        components=tuple(args.component),
        env=args.env,
        replace=args.replace,
        reissue_dir=Path(args.reissue_dir) if args.reissue_dir else None,
        recovery_shares=tuple(Path(p) for p in args.recovery_shares),
        signer_keys=tuple(args.signer_key),
    )
    report = run_restore(req, loc, svc, svc.sink)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True, default=str))
        return 0
    backup = report.get("backup", {})
    scope = f", environment {escape(report['env'])} beside the others" if report.get("env") else ""
    print(f"restored from backup {escape(backup.get('id'))} ({report.get('keys')}{scope}):")
    for name, counts in report.get("parts", {}).items():
        print(f"  {name}: {escape(counts)}")
    if "reissue" in report:
        r = report["reissue"]
        print(f"  certificates: {r['issued']} re-issued into {escape(args.reissue_dir)}, {len(r['revoked'])} revoked")
    if report.get("resumed"):
        print(f"resumed an unfinished restore: {escape(', '.join(report['resumed']))} checked against the targets")
    for warning in report.get("warnings", []):
        print(f"WARNING: {escape(warning)}")
    print(f"record {escape(report['record'])}")
    return 0


def _common(p: Any) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="DIR|s3://BUCKET/PREFIX")
    p.add_argument("--id", help="the backup to use (default: the newest)")
    p.add_argument(
        "--recovery-shares",
        action="append",
        default=[],
        metavar="FILE",
        help="a mode-600 file of recovery key shares, one per line (when the production key is not reachable)",
    )
    p.add_argument(
        "--signer-key",
        action="append",
        default=[],
        metavar="HEX",
        help="a backup signing key (hex, as backup create prints it) trusted to sign manifests"
        " (default: this host's own, backup-signing.key)",
    )
    p.add_argument("--json", action="store_true")


def add_drill_commands(bsub: Any) -> None:
    """Add ``drill`` and ``restore`` to the ``backup`` group's subparsers."""
    d = bsub.add_parser("drill", help="restore a backup into a throwaway environment, check, time and record it")
    _common(d)
    d.add_argument("--sample", type=_sample, help="check N artifacts of the registry picked at random (default: all)")
    d.add_argument("--path", action="append", default=[], help="a sealed file or folder to check too")
    d.add_argument("--keystore-shares", action="append", default=[], metavar="FILE", help="mode-600 file of shares")
    d.add_argument("--bao-unseal-keys", metavar="FILE", help="mode-600 file of the OpenBao cluster's unseal keys")
    d.add_argument("--bao-token-file", metavar="FILE", help="mode-600 file of the OpenBao token (else $BAO_TOKEN)")
    where = d.add_mutually_exclusive_group()
    where.add_argument("--registry-blobs", metavar="URL", help="the live blob store (file:///PATH or s3://...)")
    where.add_argument("--registry-data", metavar="DIR", help="the live registry --data (its blobs/ are read)")
    d.add_argument("--rto", type=_duration, help="recovery time objective (default: [backup] rto)")
    d.add_argument("--rpo", type=_duration, help="recovery point objective (default: [backup] rpo)")
    d.add_argument("--witness", metavar="DIR", help="a witness folder whose latest checkpoint the audit log must match")
    d.set_defaults(fn=cmd_drill)

    from modelseal.recovery.parts import PART_NAMES

    r = bsub.add_parser("restore", help="restore one environment or some components for real")
    _common(r)
    r.add_argument(
        "--component",
        action="append",
        default=[],
        choices=PART_NAMES,
        help="a part to restore (with --env: only the parts named, the host-wide ones whole)",
    )
    r.add_argument(
        "--env",
        help="restore a backup made for this environment beside the others: its keys merged, its governance rows"
        " only; config, registry and audit only when named with --component",
    )
    r.add_argument("--replace", action="store_true", help="replace what is there (else a non-empty target refuses)")
    r.add_argument("--reissue-dir", metavar="DIR", help="where the certificates re-issued after a CA restore go")
    r.add_argument("--data", help="the registry's --data (as modelseal serve takes it)")
    r.add_argument("--db", help="the registry's --db (postgresql://..., no password)")
    r.add_argument("--governance-db", help="the governance tables' database (default: --db)")
    r.add_argument("--bao-addr", help="the OpenBao cluster to restore the snapshot into (default: $BAO_ADDR)")
    r.add_argument("--bao-token-file", metavar="FILE", help="mode-600 file of its token (else $BAO_TOKEN)")
    r.set_defaults(fn=cmd_restore)
