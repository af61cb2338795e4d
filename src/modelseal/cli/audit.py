"""The ``audit`` commands: verify the Merkle log, prove an entry, checkpoint to a witness, list events."""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from modelseal.cli.common import fmt_time
from modelseal.keys.service import KeyService
from modelseal.util.home import modelseal_home


def cmd_audit(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.audit.log import AuditLogError, MerkleAuditLog

    log = MerkleAuditLog(os.environ.get("MODELSEAL_AUDIT_URL") or modelseal_home() / "audit.db")
    if args.audit_cmd == "verify":
        if args.witness:
            try:
                checkpoint = json.loads((Path(args.witness) / "latest.json").read_text())
            except (OSError, ValueError):
                raise AuditLogError(f"no readable checkpoint in {args.witness}") from None
            v = log.verify_against(checkpoint)
        else:
            v = log.verify()
        if not v.ok:
            raise AuditLogError(f"audit log does NOT verify: {v.reason}")
        print(f"audit log verifies: {v.size} entries, tree head {v.head.hex()}")
        return 0
    if args.audit_cmd == "prove":
        print(json.dumps(log.prove(args.entry), indent=2, sort_keys=True))
        return 0
    if args.audit_cmd == "checkpoint":
        cp = log.checkpoint(Path(args.witness))
        print(f"checkpoint of {cp['size']} entries written to {args.witness}")
        return 0
    since = datetime.fromisoformat(args.since).timestamp() if args.since else None
    for e in log.events(key=args.key, since=since):
        if args.json:
            print(json.dumps(e, sort_keys=True))
        else:
            version = f" v{e['version']}" if e.get("version") is not None else ""
            art = f" artifact {e['artifact'][:16]}" if e.get("artifact") else ""
            print(
                f"{e['entry']:>6} {fmt_time(e['time'])} {e['actor']:10} {e['operation']:8} {e['key']}{version}"
                f"{art} -> {e['result']}"
            )
    return 0


def add_audit(sub: Any) -> None:
    a = sub.add_parser("audit", help="the tamper-evident audit log of key operations")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    av = asub.add_parser("verify", help="recompute the log; name the first bad entry")
    av.add_argument("--witness", help="also check against the latest checkpoint saved in this folder")
    ap = asub.add_parser("prove", help="an inclusion proof for one entry")
    ap.add_argument("entry", type=int)
    ac = asub.add_parser("checkpoint", help="export a signed checkpoint to a witness folder")
    ac.add_argument("--witness", required=True)
    al = asub.add_parser("log", help="list events")
    al.add_argument("--key", help="only this key URI")
    al.add_argument("--since", help="ISO time, e.g. 2026-11-01T00:00:00+00:00")
    al.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_audit)
