"""The artifact commands: ``seal``, ``unseal``, ``inspect``, ``rewrap`` and ``reencrypt``.

Thin: parse, call a recipe, print one line per artifact.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modelseal.cli.common import ProgressBar, escape, parse_context, print_report, size_of
from modelseal.keys.service import KeyService
from modelseal.recipes import inspect as inspection
from modelseal.recipes import rekey
from modelseal.recipes.recipients import RekeyPlan
from modelseal.recipes.seal import seal
from modelseal.recipes.unseal import unseal
from modelseal.signing.load import load_signer
from modelseal.signing.trust import load_policy


def cmd_seal(args: argparse.Namespace, svc: KeyService) -> int:
    bar = ProgressBar(size_of(Path(args.src)), "seal")
    try:
        res = seal(
            args.src,
            args.dst,
            key=args.key,
            context=parse_context(args.context),
            env=args.env,
            project=args.project,
            force=args.force,
            progress=bar,
            keys=svc,
            sign_key=load_signer(args.sign_key) if args.sign_key else None,
            name=args.name,
            version=args.version,
        )
    finally:
        bar.close()
    print(f"sealed {res.files} file(s), {res.bytes} bytes -> {res.path} (artifact {res.artifact_id[:16]})")
    if res.signature:
        print(f"signed (signature {res.signature[:16]})")
    return 0


def cmd_unseal(args: argparse.Namespace, svc: KeyService) -> int:
    bar = ProgressBar(size_of(Path(args.src)), "unseal")
    try:
        verify = load_policy(args.trust) if args.trust else None
        out = unseal(
            args.src,
            args.dst,
            force=args.force,
            progress=bar,
            keys=svc,
            verify=verify,
            expect_name=args.name,
            expect_env=args.env,
        )
    finally:
        bar.close()
    print(f"unsealed -> {out}")
    return 0


def cmd_inspect(args: argparse.Namespace, svc: KeyService) -> int:
    print_report(inspection.inspect(args.path, contents=args.contents, keys=svc), args.json)
    return 0


def _show_plan(plan: RekeyPlan, dry_run: bool = False) -> None:
    # ``stored`` is escaped already (key ids read from the artifact); ``write`` are the operator's URIs.
    print(
        f"{escape(plan.path)}: recipients {', '.join(plan.stored)} -> will write {', '.join(map(escape, plan.write))}"
        + (" (dry run: nothing written)" if dry_run else "")
    )


def _rekey_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"key": args.key or None, "keep_recipients": args.keep_recipient or ()}


def cmd_rewrap(args: argparse.Namespace, svc: KeyService) -> int:
    for p in args.paths:
        if args.dry_run:
            _show_plan(rekey.plan(p, keys=svc, **_rekey_args(args)), dry_run=True)
            continue
        res = rekey.rewrap(p, keys=svc, confirm=_show_plan, **_rekey_args(args))
        recipients = ", ".join(escape(r) for r in res.recipients)  # key ids read from the artifact
        print(f"rewrapped {res.path} -> {recipients} (slot generation {res.generation})")
    return 0


def cmd_reencrypt(args: argparse.Namespace, svc: KeyService) -> int:
    for p in args.paths:
        if args.dry_run:
            _show_plan(rekey.plan(p, keys=svc, **_rekey_args(args)), dry_run=True)
            continue
        res = rekey.reencrypt(p, keys=svc, confirm=_show_plan, **_rekey_args(args))
        print(f"re-encrypted {res.path} under a fresh data key (artifact {res.artifact_id[:16]})")
    return 0


def add_seal(sub: Any) -> None:
    s = sub.add_parser("seal", help="seal a file or a model folder")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--key", action="append", help="key URI; repeat for several recipients (default: from config.toml)")
    s.add_argument("--env", help="environment (default: config.toml's default_env, else dev); goes into the context")
    s.add_argument("--project", help="project name; goes into the context and selects config.toml's project keys")
    s.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--force", action="store_true", help="replace an existing destination")
    s.add_argument("--sign-key", metavar="PRIV.pem", help="sign while sealing: Ed25519 or P-256 PEM, or transit:NAME")
    s.add_argument("--name", help="artifact name in the signature (default: the source's file name)")
    s.add_argument("--version", type=int, metavar="N", help="artifact version signed (default: the signer's next)")
    s.set_defaults(fn=cmd_seal)


def add_unseal(sub: Any) -> None:
    u = sub.add_parser("unseal", help="decrypt a sealed file or folder to plaintext")
    u.add_argument("src")
    u.add_argument("dst")
    u.add_argument("--force", action="store_true")
    u.add_argument("--trust", metavar="TRUST.toml", help="verify signatures first (default: configured policy)")
    u.add_argument("--name", help="require this signed artifact name (with a trust policy)")
    u.add_argument("--env", help="require this environment (default: config.toml's host_env, if declared)")
    u.set_defaults(fn=cmd_unseal)


def add_inspect(sub: Any) -> None:
    i = sub.add_parser("inspect", help="show a sealed artifact's public header")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.add_argument("--contents", action="store_true", help="also unwrap the key and show names, sizes, digests")
    i.set_defaults(fn=cmd_inspect)


def add_rewrap(sub: Any) -> None:
    r = sub.add_parser("rewrap", help="re-wrap data keys under the newest KEK version (header only)")
    r.add_argument("paths", nargs="+")
    r.add_argument("--key", action="append", help="re-wrap to this key instead (repeatable)")
    _add_recipient_flags(r)
    r.set_defaults(fn=cmd_rewrap)


def add_reencrypt(sub: Any) -> None:
    e = sub.add_parser("reencrypt", help="re-seal under a fresh data key")
    e.add_argument("paths", nargs="+")
    e.add_argument("--key", action="append", help="seal to this key (repeatable; default: the stored recipients)")
    _add_recipient_flags(e)
    e.set_defaults(fn=cmd_reencrypt)


def _add_recipient_flags(p: Any) -> None:
    p.add_argument(
        "--keep-recipient",
        action="append",
        metavar="URI",
        help="confirm a stored recipient that is not among the configured keys (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="show the recipients that would be written; write nothing")
