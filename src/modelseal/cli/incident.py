"""The ``modelseal incident`` commands (docs/recovery.md): ``incident key-compromise`` and
``incident cert-compromise``, the runbooks as commands. Thin: ``modelseal.recovery`` does the work.

Both are dry runs unless ``--execute`` is given: the plan is printed and nothing changes.
With ``--execute`` the same command, run again after a crash or a failure, resumes the
incident from its journal. Every line printed is escaped (paths and names come from
artifacts, registries and the audit log).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from modelseal.cli.common import escape
from modelseal.keys.service import KeyService
from modelseal.recovery import certcompromise as cert
from modelseal.recovery import incident_report
from modelseal.recovery import keycompromise as key
from modelseal.recovery.incident_registry import RegistryTarget

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"([0-9]{1,30}(?:\.[0-9]{1,30})?)([smhdw]?)")
MAX_DURATION = 100 * 366 * 86400.0  # longer than any window or waiting period means a typo
FUTURE_SLACK = 300.0


def parse_duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``0`` or plain seconds, up to a hundred years."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"a duration like 7d, 12h or 0, got {text[:40]!r}")
    seconds = float(m[1]) * _UNITS.get(m[2] or "s", 1.0)
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise argparse.ArgumentTypeError(f"a duration of at most {MAX_DURATION / 86400:g} days, got {text[:40]!r}")
    return seconds


def parse_since(text: str) -> float:
    """An ISO date or time (``2026-11-01``, ``2026-11-01T08:00:00+00:00``), or a duration back from
    now; from 1970 to now."""
    if _DURATION.fullmatch(text.strip()):
        t = time.time() - parse_duration(text)
    else:
        try:
            d = datetime.fromisoformat(text)
            t = d.timestamp() if d.tzinfo is not None else d.astimezone().timestamp()
        except (ValueError, OverflowError, OSError):
            raise argparse.ArgumentTypeError(
                f"--since takes an ISO date or a duration (7d), got {text[:40]!r}"
            ) from None
    if not 0 <= t <= time.time() + FUTURE_SLACK:
        raise argparse.ArgumentTypeError(f"--since must be from 1970 to now, got {text[:40]!r}")
    return t


def _print(lines: list[str]) -> None:
    for line in lines:
        print(escape(line))


def _targets(args: argparse.Namespace) -> tuple[RegistryTarget, ...]:
    """One target per ``--registry``; a ``--repo HOST:PORT/REPO`` is that registry's alone, a plain
    one every registry's; the catalog flags name one registry's store, so they take one ``--registry``."""
    hosts: list[str] = args.registry
    if (args.repo or args.registry_data or args.registry_db) and not hosts:
        raise ValueError("--repo, --registry-data and --registry-db need --registry HOST:PORT")
    if (args.registry_data or args.registry_db) and len(hosts) > 1:
        raise ValueError("--registry-data and --registry-db read one registry's catalog: give one --registry")
    out = []
    for host in hosts:
        repos = [r.split("/", 1)[1] if r.startswith(host + "/") else r for r in args.repo]
        mine = [r for r in repos if ":" not in r.split("/", 1)[0]]  # repository names hold no colon
        out.append(RegistryTarget(host, tuple(mine), args.tls_dir, tuple(args.pin), args.registry_data,
                                  args.registry_db))  # fmt: skip
    for r in args.repo:
        if ":" in r.split("/", 1)[0] and not any(r.startswith(h + "/") for h in hosts):
            raise ValueError(f"--repo {r}: no --registry {r.split('/', 1)[0]} given")
    return tuple(out)


def cmd_key_compromise(args: argparse.Namespace, svc: KeyService) -> int:
    targets = _targets(args)
    inc = key.KeyIncident(
        key=args.key,
        paths=tuple(args.path),
        registries=targets,
        accept_gone=args.accept_gone,
        sign_keys=tuple(args.sign_key),
        trust=args.trust,
        revocation_keys=tuple(args.revocation_key),
        keep_recipients=tuple(args.keep_recipient),
        destroy_after=args.destroy_after,
        new_incident=args.new_incident,
        work=args.work_dir,
        reason=args.reason,
    )
    if not args.execute:
        p = key.plan(inc, svc)
        if args.json:
            print(json.dumps(p.to_json(), indent=2, sort_keys=True))
        else:
            _print(p.lines())
            print("dry run: nothing was changed; run the same command with --execute")
        return 0

    def progress(line: str) -> None:
        if sys.stderr.isatty():
            print(escape(line), file=sys.stderr)

    report = key.execute(inc, svc, progress=progress, report_to=Path(args.report) if args.report else None)
    _done(report, incident_report.key_summary(report), args)
    return 0


def cmd_cert_compromise(args: argparse.Namespace, svc: KeyService) -> int:
    inc = cert.CertIncident(args.target, args.since, args.rotate_ca, args.reason, args.new_incident)
    if not args.execute:
        p = cert.plan(inc, svc)
        if args.json:
            print(json.dumps(p.to_json(), indent=2, sort_keys=True))
        else:
            _print(p.lines())
            print("dry run: nothing was changed; run the same command with --execute")
        return 0
    report = cert.execute(inc, svc, report_to=Path(args.report) if args.report else None)
    _done(report, incident_report.cert_summary(report), args)
    return 0


def _done(report: dict[str, Any], lines: list[str], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    _print(lines)
    where = f" and {escape(args.report)}" if args.report else ""
    print(f"incident {escape(report['id'])} closed; report in the incident folder{where}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--execute", action="store_true", help="run the steps (default: print the plan, change nothing)")
    p.add_argument("--new-incident", action="store_true", help="a new incident on a target whose last one is closed")
    p.add_argument("--report", metavar="FILE", help="also write the report to FILE (JSON) and FILE's .txt")
    p.add_argument("--reason", help="recorded with each revocation")
    p.add_argument("--json", action="store_true")


def add_incident(sub: Any) -> None:
    p = sub.add_parser("incident", help="incident runbooks as commands: key-compromise, cert-compromise")
    isub = p.add_subparsers(dest="incident_cmd", required=True)
    k = isub.add_parser(
        "key-compromise",
        help="rotate, re-encrypt every artifact a key version protected, re-sign, revoke, verify, disable",
        description="Dry run by default. Re-running the same command resumes the incident (docs/recovery.md).",
    )
    k.add_argument("key", metavar="KEY[@VERSION]", help="key URI; @VERSION: the compromised one (default: all older)")
    k.add_argument("--path", action="append", default=[], metavar="P", help="a sealed file or a folder (repeatable)")
    k.add_argument("--registry", action="append", default=[], metavar="HOST:PORT",
                   help="also the artifacts of this registry (repeatable)")  # fmt: skip
    k.add_argument("--repo", action="append", default=[], metavar="R",
                   help="a repository, HOST:PORT/R for one registry's (default: the catalog)")  # fmt: skip
    k.add_argument("--registry-data", metavar="DIR", help="the registry's --data, to read its catalog")
    k.add_argument("--registry-db", metavar="URL", help="the registry's --db, to read its catalog")
    k.add_argument("--tls-dir", metavar="DIR", help="client certificate folder, as modelseal push takes it")
    k.add_argument("--pin", action="append", default=[], metavar="PIN", help="a CA pin of the registry (repeatable)")
    k.add_argument("--sign-key", action="append", default=[], metavar="PRIV", help="re-sign with it (repeatable)")
    k.add_argument("--trust", metavar="TRUST.toml", help="checks the superseded and new signatures (default: in force)")
    k.add_argument("--revocation-key", action="append", default=[], metavar="PRIV", help="signs the revocation list")
    k.add_argument("--keep-recipient", action="append", default=[], metavar="URI", help="vouch for a recipient")
    k.add_argument(
        "--destroy-after",
        type=parse_duration,
        default=7 * 86400.0,
        metavar="DUR",
        help="local keys: the compromised versions stop now, are erased after DUR (default 7d; 0: now)",
    )
    k.add_argument("--work-dir", metavar="DIR", help="registry copies (ciphertext; default: the ciphertext cache)")
    k.add_argument("--accept-gone", action="store_true",
                   help="disable even though artifacts went missing before they were re-encrypted")  # fmt: skip
    _common(k)
    k.set_defaults(fn=cmd_key_compromise, reason="key compromise")
    c = isub.add_parser(
        "cert-compromise",
        help="revoke a certificate (or an identity's), optionally roll the issuing CA, list what it did",
        description="Dry run by default. Re-running the same command resumes the incident (docs/recovery.md).",
    )
    c.add_argument("target", metavar="SERIAL|IDENTITY", help="a serial (hex) or spiffe://DOMAIN/ENV/KIND/NAME")
    c.add_argument("--since", type=parse_since, metavar="DATE|DUR", help="window start (default: its not-before)")
    c.add_argument("--rotate-ca", action="store_true", help="roll the issuing intermediate over to the standby key")
    _common(c)
    c.set_defaults(fn=cmd_cert_compromise, reason="certificate compromise")


__all__ = ["add_incident", "parse_duration", "parse_since"]
