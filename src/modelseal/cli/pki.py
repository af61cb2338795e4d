"""The ``modelseal ca`` and ``modelseal cert`` commands: the internal CA (docs/pki.md).

Thin: parse, call ``modelseal.pki``, print. Serials are printed as ``openssl x509 -serial``
does; pins as RFC 7469 base64.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from modelseal.cli.agent import parse_ttl
from modelseal.cli.common import escape, fmt_time
from modelseal.keys.service import KeyService
from modelseal.pki import backend, denylist, issue, pins, store, transit_pki
from modelseal.pki import ca as pki_ca
from modelseal.pki.identity import KINDS, Identity


def _summary(issued: issue.Issued, out: Path) -> None:
    print(
        f"issued {issued.identity} serial={issued.serial} "
        f"until {issued.cert.not_valid_after_utc.strftime('%Y-%m-%dT%H:%M:%SZ')} -> {escape(out)}"
    )


def _init_transit(args: argparse.Namespace, svc: KeyService, cfg: backend.Settings) -> int:
    mount = args.mount or cfg.transit_mount
    role = args.role or cfg.transit_role
    if not mount or not role:
        raise backend.PkiConfigError(
            "ca init --backend transit-pki needs --mount and --role (or [pki] transit_mount and transit_role)"
        )
    ca = transit_pki.init(
        svc,
        args.trust_domain,
        mount,
        role,
        server_role=args.server_role or cfg.transit_server_role,
        root_mount=args.root_mount or cfg.transit_root_mount,
        backup_pin=args.backup_pin,
        force=args.force,
    )
    print(f"CA for spiffe://{ca.trust_domain}/ is OpenBao's {escape(ca.mount)} (role {escape(ca.role)})")
    _show_pins(ca.pins(), False)
    return 0


def cmd_ca_init(args: argparse.Namespace, svc: KeyService) -> int:
    cfg = backend.settings()
    if (args.backend or cfg.backend) == "transit-pki":
        return _init_transit(args, svc, cfg)
    if args.backup_pin is not None:
        raise backend.PkiConfigError("--backup-pin is for --backend transit-pki: the local CA makes its own")
    ca = pki_ca.init_ca(svc, args.trust_domain, args.key, force=args.force)
    print(f"CA for spiffe://{ca.trust_domain}/ at {escape(ca.folder)} (keys sealed under {escape(ca.kek)})")
    _print_pins(ca, False)
    return 0


def cmd_ca_rotate(args: argparse.Namespace, svc: KeyService) -> int:
    issuer = issue.load_issuer(svc)
    if isinstance(issuer, transit_pki.TransitPKI):
        rolled = transit_pki.rotate_intermediate(issuer)
        print("the OpenBao mount's default issuer is now the backup key's; give clients the new backup pin:")
        _show_pins(rolled.pins(), False)
        return 0
    ca = pki_ca.rotate_intermediate(svc)
    print(f"issuing CA is now generation {ca.generation}; give clients the new backup pin:")
    _print_pins(ca, False)
    return 0


def _show_pins(shown: dict[str, str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(shown, indent=2, sort_keys=True))
        return
    for k, v in shown.items():
        print(f"{k + ' pin':12} {v}")


def _print_pins(ca: pki_ca.CA, as_json: bool) -> None:
    _show_pins(
        {"live": pins.pin_of(ca.issuing), "backup": pins.pin_of_key(ca.next_public), "root": pins.pin_of(ca.root)},
        as_json,
    )


def cmd_ca_pins(args: argparse.Namespace, svc: KeyService) -> int:
    issuer = issue.load_issuer(svc)
    if isinstance(issuer, transit_pki.TransitPKI):
        _show_pins(issuer.pins(), args.json)
    else:
        _print_pins(pki_ca.load_ca(issuer.folder), args.json)
    return 0


def cmd_cert_issue(args: argparse.Namespace, svc: KeyService) -> int:
    issuer = issue.load_issuer(svc)
    identity = Identity.of(issuer.trust_domain, args.env, args.kind, args.name)
    ttl = None if args.ttl is None else dt.timedelta(seconds=args.ttl)
    issued = issue.issue(svc, identity, dns=args.dns, ips=args.ip, ttl=ttl, ca=issuer)
    issue.write_dir(issued, Path(args.out), force=args.force)
    _summary(issued, Path(args.out))
    return 0


def cmd_cert_renew(args: argparse.Namespace, svc: KeyService) -> int:
    issued = issue.renew(svc, Path(args.dir))
    _summary(issued, Path(args.dir))
    return 0


def cmd_cert_revoke(args: argparse.Namespace, svc: KeyService) -> int:
    serial = denylist.parse_serial(args.serial)
    added, renewals = issue.revoke_all(svc, serial, args.reason)
    print(f"serial {denylist.serial_hex(serial)} {'revoked' if added else 'was revoked already'}")
    for hexed in renewals:
        print(f"serial {hexed} revoked (renewed from {denylist.serial_hex(serial)})")
    return 0


def cmd_cert_list(args: argparse.Namespace, svc: KeyService) -> int:
    rows = issue.list_issued()
    revoked = denylist.load(store.ca_dir())
    out = [
        {
            "serial": str(r.get("serial")),
            "identity": str(r.get("identity")),
            "not_after": fmt_time(issue.not_after_of(r)),
            "revoked": revoked.revoked(denylist.parse_serial(str(r.get("serial")))),
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    for r in out:
        print(f"{r['serial']}  {r['not_after']}  {escape(r['identity'])}{'  REVOKED' if r['revoked'] else ''}")
    return 0


def add_ca(sub: Any) -> None:
    p = sub.add_parser("ca", help="the internal CA of modelseal's servers and clients (docs/pki.md)")
    csub = p.add_subparsers(dest="ca_cmd", required=True)
    i = csub.add_parser("init", help="create the root and issuing CA, keys sealed under a KEK")
    i.add_argument("--trust-domain", default=pki_ca.DEFAULT_TRUST_DOMAIN, help="the DOMAIN of spiffe://DOMAIN/...")
    i.add_argument(
        "--key", default=store.DEFAULT_KEK, metavar="URI", help="KEK sealing the CA keys (default local:modelseal-ca)"
    )
    i.add_argument("--force", action="store_true", help="replace an existing CA (its certificates stop verifying)")
    i.add_argument(
        "--backend", choices=backend.BACKENDS, help="local (default, or [pki] backend) or transit-pki: OpenBao's PKI"
    )
    i.add_argument("--mount", metavar="MOUNT", help="transit-pki: the issuing CA's PKI mount ([pki] transit_mount)")
    i.add_argument("--role", metavar="ROLE", help="transit-pki: the role leaves are signed under ([pki] transit_role)")
    i.add_argument("--server-role", metavar="ROLE", help="transit-pki: the role of server leaves (default --role)")
    i.add_argument("--root-mount", metavar="MOUNT", help="transit-pki: the root's mount, for rotate-intermediate")
    i.add_argument("--backup-pin", metavar="PIN", help="transit-pki: the backup pin of a key kept outside OpenBao")
    i.set_defaults(fn=cmd_ca_init)
    r = csub.add_parser("rotate-intermediate", help="roll the issuing CA over to the standby key (the backup pin)")
    r.set_defaults(fn=cmd_ca_rotate)
    s = csub.add_parser("pins", help="print the live, backup and root pins (base64 SHA-256 of the SPKI)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_ca_pins)


def add_cert(sub: Any) -> None:
    p = sub.add_parser("cert", help="issue, renew, revoke and list certificates of the internal CA")
    csub = p.add_subparsers(dest="cert_cmd", required=True)
    i = csub.add_parser("issue", help="issue a certificate and key into a folder")
    i.add_argument("name", metavar="NAME")
    i.add_argument("--kind", required=True, choices=KINDS)
    i.add_argument("--env", required=True, metavar="ENV")
    i.add_argument("--dns", action="append", default=[], metavar="HOST", help="server only; repeatable")
    i.add_argument("--ip", action="append", default=[], metavar="ADDR", help="server only; repeatable")
    i.add_argument("--ttl", type=parse_ttl, help="lifetime (default 24h, or [pki] max_ttl if lower)")
    i.add_argument("--out", required=True, metavar="DIR", help="writes DIR/cert.pem, DIR/key.pem, DIR/ca.pem")
    i.add_argument("--force", action="store_true", help="replace the certificate files already in DIR")
    i.set_defaults(fn=cmd_cert_issue)
    r = csub.add_parser("renew", help="renew the still-valid certificate in DIR (fresh key, same identity)")
    r.add_argument("dir", metavar="DIR")
    r.set_defaults(fn=cmd_cert_renew)
    v = csub.add_parser("revoke", help="deny a certificate serial and every certificate renewed from it, at once")
    v.add_argument("serial", metavar="SERIAL", help="hex, as openssl x509 -serial prints it")
    v.add_argument("--reason", default="", help="recorded with the serial")
    v.set_defaults(fn=cmd_cert_revoke)
    ls = csub.add_parser("list", help="certificates this CA issued that have not expired long ago")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_cert_list)


__all__ = ["add_ca", "add_cert"]
