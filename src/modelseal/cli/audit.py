"""The ``audit`` commands: verify the Merkle log, prove an entry, checkpoint to a witness, list
the events that verify, and print this host's audit key for the other hosts of a shared log."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from modelseal.cli.common import escape, fmt_time
from modelseal.keys.service import KeyService
from modelseal.util.home import modelseal_home


def _event_line(e: dict[str, Any]) -> str:
    """One event as one line; every field comes from the database and is escaped."""
    version = f" v{escape(e['version'])}" if e.get("version") is not None else ""
    art = f" artifact {escape(str(e['artifact'])[:16])}" if e.get("artifact") else ""
    try:
        when = fmt_time(float(e.get("time", 0)))
    except (TypeError, ValueError, OverflowError, OSError):
        when = escape(e.get("time"))
    return (
        f"{e['entry']:>6} {when} {escape(e.get('actor')):10} {escape(e.get('operation')):8} "
        f"{escape(e.get('key'))}{version}{art} -> {escape(e.get('result'))}"
    )


def cmd_audit(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.audit.hosts import host_line, key_id
    from modelseal.audit.log import AuditLogError, MerkleAuditLog, Verification, read_checkpoint

    log = MerkleAuditLog(os.environ.get("MODELSEAL_AUDIT_URL") or modelseal_home() / "audit.db")
    if args.audit_cmd == "verify":
        v = log.verify(read_checkpoint(Path(args.witness)) if args.witness else None)
        if not v.ok:
            raise AuditLogError(f"audit log does NOT verify: {escape(v.reason)}")
        print(f"audit log verifies: {v.size} entries, tree head {v.head.hex()}")
        return 0
    if args.audit_cmd == "prove":
        print(json.dumps(log.prove(args.entry), indent=2, sort_keys=True))
        return 0
    if args.audit_cmd == "checkpoint":
        cp = log.checkpoint(Path(args.witness))
        print(f"checkpoint of {cp['size']} entries written to {args.witness}")
        return 0
    if args.audit_cmd == "key":
        public = log.signing_key.public_key()
        print(host_line(args.name or socket.gethostname(), public))
        print(f"# key id {key_id(public)}: add the line above to {log.hosts_path.name} on every host sharing the log")
        return 0
    since = datetime.fromisoformat(args.since).timestamp() if args.since else None
    listed: Verification | None = None
    if args.unverified:
        print("modelseal: warning: listing the audit log without verifying it: entries may be forged", file=sys.stderr)
        events = log.events(key=args.key, since=since, unverified=True)
    else:
        events, listed = log.verified_events(key=args.key, since=since)
    for e in events:
        print(json.dumps(e, sort_keys=True) if args.json else _event_line(e))
    if listed is not None and not listed.ok:
        hidden = f"; entries from {listed.first_bad} on are not shown" if listed.first_bad is not None else ""
        raise AuditLogError(f"audit log does NOT verify: {escape(listed.reason)}{hidden} (--unverified lists them)")
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
    al.add_argument("--unverified", action="store_true", help="list every row, even if the log does not verify")
    ak = asub.add_parser("key", help="print this host's audit key as a line for audit-hosts.toml (shared logs)")
    ak.add_argument("--name", help="the host name in the line (default: this host's name)")
    a.set_defaults(fn=cmd_audit)
