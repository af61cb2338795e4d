"""The ``alerts`` and ``events`` commands (docs/monitoring.md, "Alerts" and "Events").

``alerts keygen`` makes the webhook signing key and prints its public half; ``alerts
verify`` is a receiver's check of one delivery (the body on stdin); ``alerts test`` sends a
test alert through the sinks of ``[monitor.alerts]`` and says which delivered it. ``events
export`` writes the security events of the local audit log (the entries that verify) as
JSON lines or OTLP/JSON, for a SIEM's backfill. Thin: parse, call ``modelseal.telemetry``,
print.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelseal.cli.common import escape
from modelseal.errors import ModelsealError, StorageError
from modelseal.keys.service import KeyService
from modelseal.util.home import modelseal_home

TEST_SUMMARY = "modelseal test alert: a delivery check, no action needed"


def _alerts_table() -> dict[str, Any]:
    from modelseal.keys.config import ConfigError, config_table

    table = config_table("monitor").get("alerts", {})
    if not isinstance(table, dict):
        raise ConfigError("config: [monitor.alerts] must be a table")
    return table


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError as e:
        raise StorageError(f"cannot read {what} {escape(path)}: {e.strerror}") from None


def _keygen(args: argparse.Namespace) -> int:
    from modelseal.telemetry.alertsign import generate_signing_key, key_id, public_pem

    key = generate_signing_key(Path(args.out), force=args.force)
    print(public_pem(key), end="")
    print(
        f"# key id {key_id(key.public_key())}: give the public key above to the receiver; "
        f'set signing_key = "{escape(args.out)}" in [monitor.alerts.webhook]',
        file=sys.stderr,
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from modelseal.telemetry.alertsign import KEY_ID_HEADER, MAX_BODY, SIGNATURE_HEADER, load_public_key, verify_webhook

    keys = [load_public_key(_read(p, "the public key")) for p in args.public_key]
    headers = {SIGNATURE_HEADER: args.signature_header}
    if args.key_id:
        headers[KEY_ID_HEADER] = args.key_id
    body = sys.stdin.buffer.read(MAX_BODY + 1)
    doc = verify_webhook(headers, body, keys, tolerance=args.tolerance)
    print(json.dumps(doc, sort_keys=True))
    return 0


def _test(args: argparse.Namespace) -> int:
    from modelseal.telemetry.alerting import StdoutSink, SyslogSink, WebhookSink, new_alert, send_all, sinks_from_config

    sinks = sinks_from_config(_alerts_table())
    alert = new_alert("test", "warning", TEST_SUMMARY)
    send_all(sinks, alert)
    failed = 0
    for sink in sinks:
        if isinstance(sink, WebhookSink):
            sink.flush(args.timeout)
            sink.close(0)
            stats = sink.stats
            if stats.delivered:
                print(f"webhook {sink.target.host}: delivered")
            else:
                failed += 1
                print(f"webhook {sink.target.host}: NOT delivered ({stats.last_error or 'timed out'})")
        elif isinstance(sink, SyslogSink):
            sink.close()
            print(f"syslog {escape(sink.writer.address)}: sent")
        elif isinstance(sink, StdoutSink):
            print("stdout: written")
    if failed:
        raise ModelsealError(f"{failed} of {len(sinks)} alert sink(s) did not deliver the test alert {alert.id}")
    print(f"test alert {alert.id} sent to {len(sinks)} sink(s)")
    return 0


def cmd_alerts(args: argparse.Namespace, svc: KeyService) -> int:
    return {"keygen": _keygen, "verify": _verify, "test": _test}[args.alerts_cmd](args)


def _date(text: str) -> float:
    """An ISO date or time (``2026-11-01``, ``2026-11-01T06:00:00+01:00``); UTC when no zone is given."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _write_lines(out: str, lines: list[str], force: bool) -> None:
    if out == "-":
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
        return
    from modelseal.util.files import atomic_output

    with atomic_output(Path(out), force) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())


def cmd_events(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.audit.log import AuditLogError, MerkleAuditLog
    from modelseal.telemetry.export import lines
    from modelseal.telemetry.secevents import from_audit

    target: str | Path = os.environ.get("MODELSEAL_AUDIT_URL") or modelseal_home() / "audit.db"
    if isinstance(target, Path) and not target.is_file():
        raise StorageError(f"no audit log at {escape(target)}")
    events, verification = MerkleAuditLog(target).verified_events(since=args.since)
    records = [e.to_dict() for e in map(from_audit, events) if args.until is None or e.time < args.until]
    _write_lines(args.out, list(lines(records, args.format)), args.force)
    print(f"{len(records)} event(s) exported", file=sys.stderr)
    if not verification.ok:
        hidden = f"; entries from {verification.first_bad} on were not exported" if verification.first_bad else ""
        raise AuditLogError(f"audit log does NOT verify: {escape(verification.reason)}{hidden}")
    return 0


def add_alerts(sub: Any) -> None:
    a = sub.add_parser("alerts", help="signed alert webhooks and the alert sinks (docs/monitoring.md)")
    a.set_defaults(fn=cmd_alerts)
    asub = a.add_subparsers(dest="alerts_cmd", required=True)
    k = asub.add_parser("keygen", help="make the webhook signing key (0600 PEM); prints the public key")
    k.add_argument("--out", required=True, metavar="PATH", help="the private key file to write")
    k.add_argument("--force", action="store_true", help="replace PATH if it exists")
    v = asub.add_parser("verify", help="a receiver's check of one delivery: the body on stdin, the alert on stdout")
    v.add_argument("--public-key", required=True, action="append", metavar="PEM", help="trusted key (repeatable)")
    v.add_argument("--signature-header", required=True, metavar="VALUE", help="the Modelseal-Signature header")
    v.add_argument("--key-id", metavar="HEX", help="the Modelseal-Key-Id header (names the key in errors)")
    v.add_argument("--tolerance", type=float, default=300.0, metavar="S", help="seconds of clock skew (300)")
    t = asub.add_parser("test", help="send a test alert through the sinks of [monitor.alerts]")
    t.add_argument("--timeout", type=float, default=30.0, metavar="S", help="wait for webhooks this long (30)")


def add_events(sub: Any) -> None:
    from modelseal.telemetry.export import FORMATS

    e = sub.add_parser("events", help="security events for a SIEM (docs/monitoring.md)")
    e.set_defaults(fn=cmd_events)
    esub = e.add_subparsers(dest="events_cmd", required=True)
    x = esub.add_parser("export", help="the local audit log's events (those that verify) as JSON lines or OTLP/JSON")
    x.add_argument("--from", dest="since", type=_date, metavar="DATE", help="from this ISO date or time (UTC)")
    x.add_argument("--to", dest="until", type=_date, metavar="DATE", help="before this ISO date or time (UTC)")
    x.add_argument("--format", choices=FORMATS, default="jsonl")
    x.add_argument("--out", required=True, metavar="FILE", help="the file to write, or - for standard output")
    x.add_argument("--force", action="store_true", help="replace FILE if it exists")
