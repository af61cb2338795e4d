"""The ``modelseal controls`` commands (docs/controls.md): ``controls test`` runs the simulated
intrusion attempts against a running deployment and prints the table (``--json``, and
``--record`` the evidence); ``controls canaries`` has a publisher wrap the worthless keys the
unwrap burst asks for. Thin: ``telemetry.controls`` does the work.

The registry address is ``--registry``; the controls identity's certificate folder and the
pins come as for ``modelseal push`` (``--tls-dir``/``--pin``, ``MODELSEAL_TLS_DIR``/
``MODELSEAL_REGISTRY_PINS``, ``[registry]`` of config.toml). The TOTP secret of the replay
attempt is read from ``MODELSEAL_CONTROLS_TOTP`` only, never from argv. Exit 21
(``ControlsFailed``) when an attempt FAILED; attempts NOT TESTED alone exit 0 with a line on
stderr saying which.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from modelseal.cli.common import escape
from modelseal.errors import CertificateError, ControlsFailed
from modelseal.keys.service import KeyService, default_sink
from modelseal.pki.identity import Identity
from modelseal.pki.verify import uri_identity
from modelseal.registry import settings as registry_settings
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.reference import parse_endpoint
from modelseal.util.home import modelseal_home


def _target(args: argparse.Namespace) -> Any:
    from modelseal.telemetry.attempts_tls import Target

    s = registry_settings.load(endpoints=[args.registry], tls_dir=args.tls_dir, pins=args.pin or None)
    tls_dir = registry_settings.require_tls_dir(s)
    return Target(parse_endpoint(args.registry), tls_dir, tuple(s.pins), timeout=min(float(args.timeout), 30.0))


def _identity(tls_dir: Path) -> Identity:
    try:
        leaf = x509.load_pem_x509_certificates((tls_dir / "cert.pem").read_bytes())[0]
    except (OSError, ValueError, IndexError):
        raise CertificateError(f"{tls_dir / 'cert.pem'} holds no readable certificate") from None
    return uri_identity(leaf)


def _timeout(text: str) -> float:
    value = float(text)
    if not 1.0 <= value <= 3600.0:
        raise argparse.ArgumentTypeError("--timeout is 1 to 3600 seconds")
    return value


def cmd_test(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.telemetry import canaries, controls, controlsrecord
    from modelseal.telemetry.attempts_api import TOTP_ENV

    target = _target(args)
    ident = _identity(target.tls_dir)
    home = modelseal_home()
    items = canaries.load(Path(args.canaries) if args.canaries else canaries.default_path(home))
    log = default_sink()  # this host's audit log: the pin-mismatch event, the record's event
    plan = controls.Plan(
        target,
        svc,
        log,  # type: ignore[arg-type]
        ident,
        repo=args.repo,
        key=args.key,
        canaries=items,
        totp_secret=os.environ.get(TOTP_ENV),
        timeout=args.timeout,
    )
    report = controls.run(plan, tuple(args.only))
    if args.json:
        print(json.dumps(report.to_json(), indent=1, sort_keys=True))
    else:
        print("\n".join(escape(line, backslash=False) for line in controlsrecord.table(report).splitlines()))
    if args.record:
        path, digest = controlsrecord.record(report, home, log)
        print(f"recorded {escape(path)} (sha256 {digest})", file=sys.stderr if args.json else sys.stdout)
    loud = controlsrecord.summary_line(report.rows)
    if loud:
        print(f"modelseal: warning: {loud}", file=sys.stderr)
    failed = [r.attempt for r in report.rows if r.verdict == controlsrecord.FAIL]
    if failed:
        n = len(report.rows)
        raise ControlsFailed(f"controls test: {len(failed)} of {n} attempts FAILED ({', '.join(failed)})")
    return 0


def cmd_canaries(args: argparse.Namespace, svc: KeyService) -> int:
    del svc  # the broker wraps: this host uses no key
    from modelseal.registry.transport import Transport
    from modelseal.telemetry import canaries

    s = registry_settings.load(endpoints=[args.registry], tls_dir=args.tls_dir, pins=args.pin or None)
    tls_dir = registry_settings.require_tls_dir(s)
    env = args.env or _identity(tls_dir).env
    out = Path(args.out) if args.out else canaries.default_path(modelseal_home())
    with ApiClient(Transport([parse_endpoint(args.registry)], tls_dir, s.pins)) as api:
        doc = canaries.make(api, args.key, env, args.count)
    canaries.write(out, doc)
    print(f"wrote {len(doc['items'])} canary keys of broker:{escape(args.key)} for env {escape(env)} to {escape(out)}")
    return 0


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", required=True, metavar="HOST:PORT", help="the modelseal serve to test")
    p.add_argument("--tls-dir", metavar="DIR", help="the certificate folder (default $MODELSEAL_TLS_DIR, config.toml)")
    p.add_argument("--pin", action="append", default=[], metavar="PIN", help="a pin of the issuing CA (repeatable)")


def add_controls(sub: Any) -> None:
    from modelseal.telemetry.controlsrecord import ATTEMPTS

    p = sub.add_parser(
        "controls",
        help="test the security controls of a running deployment as an intruder would (docs/controls.md)",
    )
    csub = p.add_subparsers(dest="controls_cmd", required=True)
    t = csub.add_parser(
        "test",
        help="run the simulated intrusion attempts; each must be refused and alerted",
        description="Simulated intrusion attempts against a running modelseal serve, as the controls identity "
        "(bound reader, metrics and auditor): each must be refused and its alert must fire. Exit 21 if one FAILED.",
    )
    _connection(t)
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.add_argument("--record", action="store_true", help="write the evidence record and its audit event")
    t.add_argument("--timeout", type=_timeout, default=120.0, metavar="S", help="wait for alerts (default 120 s)")
    t.add_argument("--repo", default="modelseal-controls/probe", help="the repository of the plaintext push")
    t.add_argument("--key", metavar="NAME", help="the broker key of the rotate, replay and burst attempts")
    t.add_argument("--canaries", metavar="FILE", help="canary keys (default $MODELSEAL_HOME/controls/canaries.json)")
    t.add_argument("--only", action="append", default=[], choices=ATTEMPTS, help="run only this attempt")
    t.set_defaults(fn=cmd_test)
    c = csub.add_parser(
        "canaries",
        help="as a publisher, have the broker wrap worthless canary keys for the unwrap burst",
        description="Wrap COUNT fresh random data keys (dropped at once) under broker key NAME, each with its own "
        "artifact context, and write the wrapped keys (what any sealed header shows) for controls test.",
    )
    _connection(c)
    c.add_argument("--key", required=True, metavar="NAME", help="the broker key (the controls reader unwraps it)")
    c.add_argument("--count", type=int, default=100, metavar="N", help="how many (default 100)")
    c.add_argument("--env", help="the environment of their context (default: the certificate's)")
    c.add_argument("--out", metavar="FILE", help="default $MODELSEAL_HOME/controls/canaries.json")
    c.set_defaults(fn=cmd_canaries)


__all__ = ["add_controls"]
