"""The ``modelseal backup`` commands (docs/recovery.md): ``backup keygen`` makes the offline
recovery key and splits it, ``backup create`` seals a chained, signed backup, ``backup list``
and ``backup verify`` read one back; ``backup drill`` and ``backup restore`` are in
``cli.drill``. Thin: ``modelseal.recovery`` does the work.

Shares are secrets: ``keygen`` writes each to its own 0600 file and never prints one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent
from modelseal.cli import drill
from modelseal.cli.common import escape, fmt_time, print_report
from modelseal.keys.service import KeyService
from modelseal.util.home import modelseal_home


def cmd_keygen(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.keys.providers.recovery import load_public
    from modelseal.recovery import reckey

    home = modelseal_home()
    files = reckey.generate_to(args.name, args.shares, args.threshold, home, Path(args.out))
    fp = load_public(args.name, home).fingerprint_hex
    svc.sink.emit(AuditEvent("recovery-keygen", f"recovery:{args.name}", "ok", args.threshold, fp))
    print(f"recovery key recovery:{escape(args.name)} (fingerprint {fp})")
    print(
        f"wrote {len(files)} shares to {escape(args.out)}; any {args.threshold} unlock it: hand each to its custodian"
    )
    print(f'add it to config.toml: [backup] recovery_keys = ["recovery:{escape(args.name)}"]')
    return 0


def _summary(m: Any) -> dict[str, Any]:
    return {
        "id": m.id,
        "sequence": m.sequence,
        "created": fmt_time(m.created),
        "env": m.env or "(all)",
        "host": m.host,
        "parts": [p.name for p in m.parts],
        "size": sum(p.size for p in m.parts),
        "recipients": list(m.recipients),
        "manifest_sha256": m.digest,
        "signer_key": m.signer,
    }


def _warn_rpo(m: Any) -> None:
    from modelseal.recovery.chain import rpo_warning

    line = rpo_warning(m, modelseal_home())
    if line is not None:
        print(f"modelseal: warning: {escape(line)}", file=sys.stderr)


def cmd_create(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.recovery.create import create_backup, parse_duration
    from modelseal.recovery.locations import Locations

    loc = Locations.from_args(
        modelseal_home(),
        registry_data=args.registry_data,
        registry_db=args.registry_db,
        governance_db=args.governance_db,
        bao_addr=args.bao_addr,
        bao_token_file=args.bao_token_file,
    )
    retain = parse_duration(args.retain) if args.retain is not None else None
    m = create_backup(args.to, loc, args.env, svc, retain=retain)
    if args.json:
        print_report(_summary(m), True)
        return 0
    print(
        f"backup {m.id} (sequence {m.sequence}, env {escape(m.env or '(all)')}) written to {escape(args.to)}:"
        f" {', '.join(p.name for p in m.parts)}; sealed to {', '.join(escape(r) for r in m.recipients)}"
    )
    print(f"manifest sha256 {m.digest}; signed by backup signing key {m.signer} (give it to verifiers as --signer-key)")
    return 0


def cmd_list(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.recovery.chain import list_backups

    chain = list_backups(args.source, signer_keys=tuple(args.signer_key))
    if chain:
        _warn_rpo(chain[-1])
    if args.json:
        print(json.dumps([_summary(m) for m in chain], indent=1, sort_keys=True))
        return 0
    if not chain:
        print(f"no backup in {escape(args.source)}")
    for m in chain:
        print(
            f"{m.id}  #{m.sequence}  {fmt_time(m.created)}  env {escape(m.env or '(all)')}  host {escape(m.host)}"
            f"  {len(m.parts)} parts, {sum(p.size for p in m.parts)} bytes"
        )
    return 0


def cmd_verify(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.recovery.sealing import verify_backup

    m, opened = verify_backup(
        args.source,
        args.id,
        svc=svc,
        signer_keys=tuple(args.signer_key),
        deep=args.deep,
        expect_sequence=args.expect_sequence,
        expect_manifest=args.expect_manifest,
    )
    if args.id is None:
        _warn_rpo(m)
    if args.json:
        print_report({**_summary(m), "deep": args.deep, "opened": opened}, True)
        return 0
    how = f"; every part opened here ({sum(opened.values())} bytes of plaintext checked)" if args.deep else ""
    print(f"backup {m.id} (sequence {m.sequence}) verified: signature, chain, {len(m.parts)} part digests{how}")
    return 0


def _sequence(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 2**53:
        raise argparse.ArgumentTypeError("a backup sequence is a positive whole number")
    return int(text)


def add_backup(sub: Any) -> None:
    p = sub.add_parser("backup", help="encrypted, chained backups, restore drills and restores (docs/recovery.md)")
    bsub = p.add_subparsers(dest="backup_cmd", required=True)

    kg = bsub.add_parser("keygen", help="make an offline recovery key, split into k-of-n shares")
    kg.add_argument("--name", required=True, help="the key's name: recovery:NAME")
    kg.add_argument("--shares", type=int, required=True)
    kg.add_argument("--threshold", type=int, required=True)
    kg.add_argument("--out", required=True, help="a new (or empty) folder for the share files (0600)")
    kg.set_defaults(fn=cmd_keygen)

    cr = bsub.add_parser("create", help="seal, sign and chain a backup of everything but the artifacts")
    cr.add_argument("--to", required=True, help="DIR or s3://BUCKET/PREFIX")
    cr.add_argument("--env", help="back up only this environment (default: everything)")
    cr.add_argument("--registry-data", help="the registry's --data folder")
    cr.add_argument("--registry-db", help="the registry's --db (postgresql://..., no password)")
    cr.add_argument("--governance-db", help="the governance tables' database (default: the registry's)")
    cr.add_argument("--bao-addr", help="the OpenBao cluster to snapshot (default: $BAO_ADDR)")
    cr.add_argument("--bao-token-file", help="its token, from a 0600 file (default: $BAO_TOKEN)")
    cr.add_argument("--retain", help="S3 Object Lock retention, like 30d (default: [backup] retain_days)")
    cr.add_argument("--json", action="store_true")
    cr.set_defaults(fn=cmd_create)

    for name, fn, what in (
        ("list", cmd_list, "list the backups in a store, chain checked"),
        ("verify", cmd_verify, "check a backup: signature, chain, part digests (--deep: open every part)"),
    ):
        q = bsub.add_parser(name, help=what)
        q.add_argument("--from", dest="source", required=True, help="DIR or s3://BUCKET/PREFIX")
        q.add_argument(
            "--signer-key",
            action="append",
            default=[],
            help="trust this backup signing key (hex, as backup create prints it) (default: this host's own)",
        )
        q.add_argument("--json", action="store_true")
        if name == "verify":
            q.add_argument("--id", help="the backup to verify (default: the newest)")
            q.add_argument("--deep", action="store_true", help="also unseal every part with the keys reachable here")
            q.add_argument(
                "--expect-sequence",
                type=_sequence,
                help="refuse a store whose newest backup is before this sequence (known out of band)",
            )
            q.add_argument(
                "--expect-manifest",
                metavar="SHA256",
                help="refuse a store whose chain lacks this manifest (backup create prints its SHA-256)",
            )
        q.set_defaults(fn=fn)

    drill.add_drill_commands(bsub)
