"""The ``modelseal push`` and ``modelseal pull`` commands: parse, call ``registry.transfer``, print.

Thin: the registry address, certificate folder and pins are the operator's; everything the
registry sends is handled (and escaped) below. Progress goes to stderr on a terminal.
"""

from __future__ import annotations

import argparse
from typing import Any

from modelseal.cli.common import escape
from modelseal.keys.service import KeyService
from modelseal.recipes.context import Verify, audit_verification_off
from modelseal.registry import transfer
from modelseal.signing.trust import load_policy


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="the client cert.pem, key.pem, ca.pem (modelseal cert issue); default $MODELSEAL_TLS_DIR, config.toml",
    )
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="PIN",
        help="a pin of the issuing CA (modelseal ca pins); give the live and the backup pin (repeatable)",
    )
    p.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="another instance of the same registry, tried if the first cannot be reached (repeatable)",
    )
    p.add_argument("--jobs", type=int, default=4, metavar="N", help="blobs or parts moved at once (default 4)")


def cmd_push(args: argparse.Namespace, svc: KeyService) -> int:
    del svc  # pushing needs no key: only ciphertext moves
    res = transfer.push(
        args.sealed,
        args.ref,
        tls_dir=args.tls_dir,
        pins=args.pin or None,
        endpoints=_endpoints(args),
        jobs=args.jobs,
        chunk=args.chunk_mib << 20,
        mount_from=args.mount_from,
    )
    signed = f", signatures {res.signatures}" if res.signatures else ", unsigned"
    print(f"pushed {escape(res.reference)} {res.digest} ({res.size} bytes, {res.sent} sent{signed})")
    return 0


def _endpoints(args: argparse.Namespace) -> list[str] | None:
    if not args.endpoint:
        return None
    host = args.ref.removeprefix("oci://").split("/", 1)[0]
    return [host, *args.endpoint]


def cmd_pull(args: argparse.Namespace, svc: KeyService) -> int:
    verify: Verify = None
    if args.no_verify:
        audit_verification_off(svc, "pull --no-verify")
        verify = False
    elif args.trust:
        verify = load_policy(args.trust)
    res = transfer.pull(
        args.ref,
        args.dst,
        tls_dir=args.tls_dir,
        pins=args.pin or None,
        endpoints=_endpoints(args),
        verify=verify,
        strict=True if args.strict else None,
        expect_name=args.expect_name,
        expect_env=args.env,
        force=args.force,
        jobs=args.jobs,
    )
    v = res.verdict
    how = "signatures not checked (no trust policy)"
    if v is not None:
        how = (
            f"verified, signed as {escape(v.name)} by {escape(', '.join(v.signers))}"
            if v.signed
            else "verified, unsigned"
        )
    print(f"pulled {escape(args.ref)} -> {escape(res.path)} ({res.digest}; {how})")
    return 0


def add_push(sub: Any) -> None:
    p = sub.add_parser(
        "push",
        help="push a sealed file or folder to an OCI registry (docs/push-pull.md)",
        description="Upload a sealed artifact (ciphertext only) over mutual TLS with a pinned CA; its "
        "signatures travel as OCI referrers.",
    )
    p.add_argument("sealed", metavar="SEALED", help="a sealed file or sealed folder")
    p.add_argument("ref", metavar="HOST:PORT/REPO:TAG", help="where to push it")
    _common(p)
    p.add_argument("--chunk-mib", type=int, default=32, metavar="N", help="upload chunk size in MiB (default 32)")
    p.add_argument(
        "--mount-from", metavar="REPO", help="mount blobs the registry holds in REPO instead of sending them"
    )
    p.set_defaults(fn=cmd_push)


def add_pull(sub: Any) -> None:
    p = sub.add_parser(
        "pull",
        help="pull a sealed artifact from an OCI registry, verified before it reaches DST",
        description="Download into a temporary folder beside DST, check every digest and the signatures "
        "under the trust policy, then move it into DST. A refused artifact leaves nothing behind.",
    )
    p.add_argument("ref", metavar="HOST:PORT/REPO:TAG", help="what to pull (or HOST:PORT/REPO@sha256:...)")
    p.add_argument("dst", metavar="DST", help="the sealed file or folder to create")
    _common(p)
    p.add_argument("--trust", metavar="POLICY", help="the trust policy to verify under (default: the one in force)")
    p.add_argument("--no-verify", action="store_true", help="skip signatures (digests are still checked)")
    p.add_argument("--strict", action="store_true", help="refuse an unsigned artifact")
    p.add_argument("--expect-name", metavar="NAME", help="the signed name the artifact must carry")
    p.add_argument("--env", metavar="ENV", help="the environment it must be sealed for (default: host_env)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(fn=cmd_pull)


__all__ = ["add_pull", "add_push"]
