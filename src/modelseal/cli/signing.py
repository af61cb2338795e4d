"""The signing commands of the CLI: sign, verify, revoke, signing-key (docs/signing.md).

``modelseal verify`` is the CI/CD gate; its exit codes are: 0 verified (or
unsigned with a non-strict policy), 10 verification failed (tampered, copied,
untrusted, unsigned under ``--strict``, below threshold, another name or
environment than pinned, rolled back), 11 revoked, 12 the revocation list is
missing, unsigned, forged or expired, 2 bad usage or policy, 4 not a sealed
artifact, 7 unreadable. It verifies sealed artifacts only, unless the caller asks
for a plaintext model's model-signing signature with ``--plaintext``: what a path
contains never picks the mode.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from modelseal.cli.common import escape
from modelseal.errors import DestinationExists, FormatError, RevocationListError, SigningKeyError
from modelseal.keys.service import KeyService
from modelseal.loaders.common import is_sealed_file, is_sealed_folder
from modelseal.recipes.context import TRUST_ENV, trust_policy
from modelseal.recipes.sign import sign
from modelseal.signing import oms
from modelseal.signing.load import load_signer
from modelseal.signing.plaintext import verify_plaintext
from modelseal.signing.revocation import RevocationList, new_revocation, write_list
from modelseal.signing.signers import (
    ALGORITHMS,
    ED25519,
    PASSPHRASE_ENV,
    Signer,
    VerifyKey,
    generate,
    private_pem,
)
from modelseal.signing.trust import TrustPolicy, load_policy
from modelseal.signing.verification import verify_artifact
from modelseal.util.files import write_atomic


def _policy(args: argparse.Namespace, svc: KeyService, required: bool = True) -> TrustPolicy | None:
    if getattr(args, "public_key", None):
        if getattr(args, "trust", None):
            raise ValueError("give --public-key or --trust, not both")
        return TrustPolicy.from_keys([VerifyKey.from_file(k) for k in args.public_key])
    if getattr(args, "trust", None):
        return load_policy(args.trust)
    policy = trust_policy(svc)
    if policy is None and required:
        raise ValueError(f"no trust: give --public-key or --trust, or configure a trust policy ({TRUST_ENV})")
    return policy


def _is_sealed(path: Path) -> bool:
    try:
        return is_sealed_folder(path) or (path.is_file() and is_sealed_file(path))
    except OSError:
        return False


def cmd_sign(args: argparse.Namespace, svc: KeyService) -> int:
    signer = load_signer(args.sign_key)
    sid = sign(args.path, signer, name=args.name, version=args.version, oms_bundle=args.oms, keys=svc)
    print(f"signed {args.path} (signature {sid[:16]}, key {signer.public.key_id[:16]})")
    return 0


def cmd_verify(args: argparse.Namespace, svc: KeyService) -> int:
    path = Path(args.path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    # The caller says which kind of artifact it expects; the content never decides. A gate
    # that expects sealed artifacts must not be satisfied by the plaintext of a revoked one.
    if args.plaintext:
        return _verify_plain(args, svc, path)
    if args.allow_unlisted:
        raise ValueError("--allow-unlisted applies to --plaintext only")
    policy = _policy(args, svc)
    assert policy is not None
    if not _is_sealed(path):
        raise FormatError(
            f"{path} is not a sealed artifact (to verify a plaintext model's model-signing signature, pass --plaintext)"
        )
    strict = True if args.strict else None
    env = args.env or svc.config.host_env
    verdict = verify_artifact(
        path, policy, signature=args.signature, strict=strict, expect_name=args.name, expect_env=env
    )
    if args.json:
        print(json.dumps(verdict.to_json(), indent=2, sort_keys=True))
    elif not verdict.signed:
        print(f"UNSIGNED {path}: allowed because the trust policy is not strict (use --strict to refuse)")
    else:
        for r in verdict.results:
            # keyid and signed_at come from the signature file, verified or not: escaped
            who = escape(r.signer or "?")
            print(f"  {r.status:10.10} {who:12} key {escape(r.keyid[:16])} signed {escape(r.signed_at)} id {r.id[:16]}")
        print(f"VERIFIED {path}: {verdict.name!r} env {verdict.env!r} by {escape(', '.join(verdict.signers))}")
    return 0


def _verify_plain(args: argparse.Namespace, svc: KeyService, path: Path) -> int:
    """A plaintext model with an OpenSSF model-signing signature (``--plaintext`` only)."""
    pins: dict[str, Any] = {
        "strict": args.strict,
        "allow_unlisted": args.allow_unlisted,
        "expect_name": args.name,
        "expect_env": args.env or svc.config.host_env,
    }
    if args.public_key:
        if args.trust:
            raise ValueError("give --public-key or --trust, not both")
        pins["keys"] = [oms.load_public_key(Path(k)) for k in args.public_key]
    else:
        pins["policy"] = _policy(args, svc)
    if _is_sealed(path):
        raise FormatError(f"{path} is a sealed artifact: verify it without --plaintext")
    sig = Path(args.signature) if args.signature else path / oms.SIGNATURE_NAME
    if not sig.is_file():
        raise ValueError(f"no model-signing signature {sig} was found for the plaintext model {path}")
    res = verify_plaintext(path, sig, **pins)
    if args.json:
        print(json.dumps(res.to_json(), indent=2, sort_keys=True))
    else:
        extra = f" ({len(res.unlisted)} unlisted file(s) allowed)" if res.unlisted else ""
        print(f"VERIFIED {path}: model-signing signature over {res.files} file(s){extra}")
    return 0


def cmd_revoke(args: argparse.Namespace, svc: KeyService) -> int:
    path = Path(args.list)
    signers = [load_signer(k) for k in args.sign_key]
    policy = _policy(args, svc, required=False)
    old: RevocationList | None = None
    if path.exists() or path.is_symlink():
        # Extend only a list that is authentic and current: re-signing a list an attacker
        # emptied, rolled back or restored from an expired copy would launder it.
        if policy is None or policy.revocation is None:
            raise ValueError(f"{path} exists: give --trust with a [revocation] section to authenticate it first")
        keys, owners = policy.revocation_keys()
        old = RevocationList.load(path, keys, policy.revocation.threshold, owners=owners, check_time=False)
        policy.check_version(old)
        if old.expires_at <= datetime.now(UTC) and not args.refresh_expired:
            raise RevocationListError(
                f"{path} has expired: check it is the newest list, then pass --refresh-expired to extend it"
            )
    elif not args.create:
        raise ValueError(f"{path} does not exist: pass --create to start a new revocation list")
    entries = list(old.entries) if old else []
    for kind in ("signature", "signer", "artifact"):
        for value in getattr(args, kind) or []:
            if not any(e.kind == kind and e.value == value for e in entries):
                entries.append(new_revocation(kind, value, args.reason))
    now = datetime.now(UTC).replace(microsecond=0)
    floor = policy.version_floor() if policy is not None else 0
    version = max((old.version + 1) if old else 1, floor)  # always newer, never below what was seen
    rl = RevocationList(version, now, now + timedelta(days=args.expires_in), entries)
    write_list(path, rl, *signers)
    if policy is not None:
        policy.remember_version(rl.version)
    print(f"revocation list {path}: version {rl.version}, {len(entries)} entries, expires {rl.expires_at:%Y-%m-%d}")
    return 0


def _write_public(path: Path, pem: bytes, force: bool) -> None:
    """A public key file: replaced only with ``--force`` (a verifier may pin the old one)."""
    if path.exists() and not force:
        raise DestinationExists(f"{path} exists; use --force to replace it")
    try:
        write_atomic(path, pem, mode=0o644, exclusive=not force)
    except FileExistsError:
        raise DestinationExists(f"{path} exists; use --force to replace it") from None


def cmd_signing_key(args: argparse.Namespace, svc: KeyService) -> int:
    del svc
    if args.private.startswith(("transit:", "pkcs11:")):
        scheme, _, name = args.private.partition(":")
        if scheme == "transit":
            from modelseal.signing.transit import create_signing_key as create_transit

            made: Signer = create_transit(name, args.algorithm)
        else:
            from modelseal.signing.pkcs11 import create_signing_key as create_pkcs11

            made = create_pkcs11(name, args.algorithm)
        _write_public(Path(args.public), made.public.pem().encode(), args.force)
        print(f"{args.algorithm} signing key {made.public.key_id[:16]} in {args.private}; public {args.public}")
        return 0
    signer = generate(args.algorithm)
    passphrase = None
    if args.encrypt:
        env = os.environ.get(PASSPHRASE_ENV)
        if not env:
            raise SigningKeyError(f"--encrypt takes the passphrase from {PASSPHRASE_ENV}")
        passphrase = env.encode()
    priv, pub = Path(args.private), Path(args.public)
    if pub.exists() and not args.force:  # checked first: no new private key without its public one
        raise DestinationExists(f"{pub} exists; use --force to replace it")
    try:
        write_atomic(priv, private_pem(signer, passphrase), mode=0o600, exclusive=True)
    except FileExistsError:
        raise DestinationExists(f"{priv} exists; refusing to overwrite a private key") from None
    _write_public(pub, signer.public.pem().encode(), args.force)
    print(f"{args.algorithm} signing key {signer.public.key_id[:16]}: private {priv}, public {pub}")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("sign", help="sign an existing sealed artifact (second signer, or re-sign after an update)")
    s.add_argument("path")
    s.add_argument("--sign-key", required=True, metavar="PRIV.pem", help="a PEM file, or transit:NAME")
    s.add_argument("--name", help="artifact name the trust policy matches (default: the previous signature's)")
    s.add_argument(
        "--version", type=int, metavar="N", help="artifact version signed (default: this signer's next for the name)"
    )
    s.add_argument("--oms", action="store_true", help="also attach a model-signing bundle (needs the data key)")
    s.set_defaults(fn=cmd_sign)

    v = sub.add_parser("verify", help="verify signatures without any decryption key (exit codes: docs/ci.md)")
    v.add_argument("path", help="a sealed file or folder (or, with --plaintext, a plaintext model)")
    v.add_argument("--public-key", action="append", metavar="PUB.pem", help="trust this key (repeatable)")
    v.add_argument("--trust", metavar="TRUST.toml", help="trust policy (default: $MODELSEAL_TRUST, config.toml)")
    v.add_argument("--signature", help="signature file (default: beside or inside the artifact; model.sig)")
    v.add_argument("--strict", action="store_true", help="refuse unsigned artifacts whatever the policy says")
    v.add_argument("--name", help="require this signed artifact name (pins which artifact this path must be)")
    v.add_argument("--env", help="require this environment (default: config.toml's host_env, if declared)")
    v.add_argument(
        "--plaintext", action="store_true", help="expect a plaintext model with a model-signing signature, not sealed"
    )
    v.add_argument("--allow-unlisted", action="store_true", help="--plaintext: accept files the signature omits")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_verify)

    r = sub.add_parser("revoke", help="add to (or just refresh) a signed revocation list")
    r.add_argument("--list", required=True, metavar="REVOCATIONS.json")
    r.add_argument("--sign-key", required=True, action="append", metavar="PRIV.pem", help="repeat for a threshold")
    r.add_argument("--signature", action="append", metavar="ID", help="revoke a signature id (repeatable)")
    r.add_argument("--signer", action="append", metavar="KEYID", help="revoke every signature of a key")
    r.add_argument("--artifact", action="append", metavar="DIGEST", help="revoke an artifact by digest")
    r.add_argument("--reason", default="", help="recorded with each new entry")
    r.add_argument("--expires-in", type=int, default=30, metavar="DAYS", help="validity of the new list (30)")
    r.add_argument("--trust", metavar="TRUST.toml", help="authenticate the existing list with this policy first")
    r.add_argument("--create", action="store_true", help="start a new list (refused if LIST exists)")
    r.add_argument("--refresh-expired", action="store_true", help="extend a list that has already expired")
    r.set_defaults(fn=cmd_revoke)

    k = sub.add_parser("signing-key", help="generate a signing key pair: PEM files, transit:NAME or pkcs11:...")
    k.add_argument("private", help="PEM file to create, transit:NAME (OpenBao/Vault) or pkcs11:token=T;object=O")
    k.add_argument("public")
    k.add_argument("--algorithm", choices=ALGORITHMS, default=ED25519)
    k.add_argument("--encrypt", action="store_true", help=f"encrypt the private key with ${PASSPHRASE_ENV}")
    k.add_argument("--force", action="store_true", help="replace an existing public key file (never a private key)")
    k.set_defaults(fn=cmd_signing_key)
