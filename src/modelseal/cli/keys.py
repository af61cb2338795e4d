"""The key commands: ``init``, ``key ...``, ``rotate`` and ``recovery`` (docs/keys.md).

Thin: parse, call the key service or a recipe, print one report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent
from modelseal.cli.common import escape, fmt_time, parse_days, print_report
from modelseal.errors import DestinationExists, ModelsealError
from modelseal.keys import keystore
from modelseal.keys.providers import KeyInfo
from modelseal.keys.service import KeyService
from modelseal.util.files import write_atomic


def _key_row(info: KeyInfo, svc: KeyService | None = None) -> dict[str, Any]:
    now = time.time()
    envs = sorted(svc.environments_of(info.uri)) if svc is not None else []
    policy = min((svc.config.rotation_days(e) for e in envs), default=None) if svc is not None else None
    if svc is not None and policy is None:
        policy = svc.config.rotate_after_days
    newest = max(info.versions, key=lambda v: v.version)
    age = (now - newest.created) / 86400 if newest.created else None
    return {
        "key": info.uri,
        "environments": envs,
        "rotate_after_days": policy,
        "rotation_due": bool(policy is not None and age is not None and age > policy),
        "latest_version": info.latest,
        "min_decryption_version": info.min_decryption_version,
        "versions": [
            {
                "version": v.version,
                "state": v.state,
                "created": fmt_time(v.created),
                "age_days": round((now - v.created) / 86400, 1),
            }
            for v in info.versions
        ],
    }


def _changes(before: KeyInfo, after: KeyInfo) -> str:
    old = {v.version: v.state for v in before.versions}
    moved = [
        f"v{v.version} {old[v.version]} -> {v.state}" for v in after.versions if old.get(v.version, v.state) != v.state
    ]
    return f"{after.uri}: " + ("; ".join(moved) if moved else "no change")


def cmd_init(args: argparse.Namespace, svc: KeyService) -> int:
    path = keystore.keystore_path()
    ks = keystore.create(path, keystore.read_passphrase(confirm=True))
    print(f"created keystore {ks.path}")
    return 0


def cmd_key(args: argparse.Namespace, svc: KeyService) -> int:
    if args.key_cmd == "list":
        infos = svc.list(args.scheme) if not args.name else [svc.info(args.name)]
        rows = [_key_row(i, svc) for i in infos]
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in rows if not args.json else []:
            latest = r["versions"][-1]
            due = "ROTATE" if r["rotation_due"] else "ok"
            envs = ",".join(r["environments"]) or "-"
            print(
                f"{escape(r['key']):40} v{r['latest_version']:<3} {escape(latest['state']):9} env {envs:10} "
                f"age {latest['age_days']}d / policy {r['rotate_after_days']}d {due}"
            )
        return 0
    if args.key_cmd == "create":
        info = svc.create(args.name)
    elif args.key_cmd == "rotate":
        info = svc.rotate(args.name)
    elif args.key_cmd in ("disable", "enable", "min-version"):
        before = svc.info(args.name)
        if args.key_cmd == "min-version":
            info = svc.set_min_version(args.name, args.version)
        else:
            info = svc.set_state(args.name, args.version, "disabled" if args.key_cmd == "disable" else "active")
        # Say exactly what changed (Transit's switch is a minimum version: never assume one version moved).
        print(_changes(before, info), file=sys.stderr if args.json else sys.stdout)
    elif args.key_cmd == "cancel-destroy":
        info = svc.cancel_destroy(args.name, args.version)
    elif args.key_cmd == "purge":
        from modelseal.keys.providers.local import LocalProvider

        done = LocalProvider().purge()
        for item in done:
            name, _, version = item.partition("#")
            svc.sink.emit(AuditEvent("purge", f"local:{name}", "ok", int(version)))
        print(f"erased {len(done)} key version(s) whose waiting period was over: {', '.join(done) or '-'}")
        return 0
    else:  # destroy
        what = f"version {args.version} of {args.name}" if args.version else f"every version of {args.name}"
        if not args.yes:
            if not sys.stdin.isatty():
                raise ModelsealError(f"refusing to destroy {what} without --yes")
            answer = input(
                f"destroy {what}? Artifacts sealed only to it become unreadable forever. Type the key name: "
            )
            if answer.strip() != args.name:
                raise ModelsealError("not confirmed; nothing destroyed")
        after = 0.0 if args.now else parse_days(args.after) * 86400
        if not args.now and not 0 < after < float("inf"):
            raise ValueError("--after must be a positive duration (use --now to erase at once)")
        info = svc.destroy(args.name, args.version, after=after)
        if after:
            when = fmt_time(time.time() + after)
            print(f"{what} stops working now and will be erased after {when} (key cancel-destroy undoes it)")
    print_report(_key_row(info, svc), args.json)
    return 0


def cmd_rotate(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.recipes.rotation import rotate

    older = parse_days(args.older_than) if args.older_than else None
    report = rotate(
        args.key,
        [Path(p) for p in args.paths],
        older_than_days=older,
        force=args.force,
        keys=svc,
        progress=lambda name: print(f"rewrapped {escape(name)}", file=sys.stderr) if sys.stderr.isatty() else None,
        keep_recipients=args.keep_recipient or (),
    )
    what = "rotated to" if report.rotated else "not due; newest is"
    print(
        f"{report.key}: {what} v{report.latest_version}; rewrapped {len(report.rewrapped)}, "
        f"already current {len(report.up_to_date)}, not using the key {report.not_using_key}, "
        f"failed {len(report.failed)}"
    )
    for name, why in report.failed:
        print(f"failed: {escape(name)}: {escape(why)}", file=sys.stderr)
    if report.failed:
        raise ModelsealError(
            f"{len(report.failed)} artifact(s) or folder(s) failed and were not rewrapped (every artifact still"
            " opens); fix what is listed above and run rotate again"
        )
    return 0


def cmd_recovery(args: argparse.Namespace, svc: KeyService) -> int:
    if args.recovery_cmd == "rotate-root":
        return _rotate_root(args, svc)
    if args.recovery_cmd == "split":
        out = Path(args.out)
        names = [out / f"share-{i}-of-{args.shares}.txt" for i in range(1, args.shares + 1)]
        taken = [n.name for n in names if n.exists() or n.is_symlink()]
        if taken and not args.force:
            raise DestinationExists(f"{out} already holds {', '.join(taken)}; use --force to replace them")
        shares = keystore.split_root(args.shares, args.threshold)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, share in zip(names, shares, strict=True):
            # Each share is a secret: written 0600, never printed. Hand each to its custodian.
            try:
                write_atomic(name, (share + "\n").encode(), mode=0o600, exclusive=not args.force)
            except FileExistsError:
                raise DestinationExists(f"{name} appeared meanwhile; use --force to replace it") from None
        svc.sink.emit(AuditEvent("recovery-split", "local:*", "ok", args.threshold, f"{len(shares)} shares"))
        print(f"wrote {len(shares)} shares to {out}; any {args.threshold} restore the keystore")
        return 0
    mnemonics: list[str] = []
    for f in args.share_files:
        text = sys.stdin.read() if f == "-" else Path(f).read_text(encoding="utf-8")
        mnemonics += [line.strip() for line in text.splitlines() if line.strip()]
    try:
        keystore.recover_root(mnemonics, keystore.read_passphrase(confirm=True))
    except ModelsealError as e:
        svc.sink.emit(AuditEvent("recovery-combine", "local:*", type(e).__name__, len(mnemonics)))
        raise
    svc.sink.emit(AuditEvent("recovery-combine", "local:*", "ok", len(mnemonics)))
    print("keystore restored; it now opens with the new passphrase")
    return 0


def _rotate_root(args: argparse.Namespace, svc: KeyService) -> int:
    new = None
    if args.new_passphrase:
        new = keystore.read_passphrase(confirm=True, env_var=keystore.NEW_PASSPHRASE_ENV, prompt="new passphrase")
    rotated, left = svc.rotate_root(new_passphrase=new)
    print(
        "rotated the keystore's root key: earlier recovery shares and earlier copies of keystore.json no longer "
        f"open it{' (new passphrase set)' if new else ''}; run 'modelseal recovery split' now"
    )
    made = ", ".join(f"{escape(k.uri)} v{k.latest}" for k in rotated) or "none"
    print(f"new KEK versions, used for everything sealed from now on: {made}")
    if left:
        print(f"not rotated (no active version, they seal nothing): {', '.join(escape(u) for u in left)}")
    print(
        "what remains: artifacts sealed before still open with the old KEK versions, which earlier shares and "
        "copies of keystore.json hold, until they are rewrapped (modelseal rotate / modelseal rewrap) and the old "
        "versions destroyed (modelseal key destroy --version N)"
    )
    return 0


def add_init(sub: Any) -> None:
    sub.add_parser("init", help="create the local keystore under $MODELSEAL_HOME").set_defaults(fn=cmd_init)


def add_key(sub: Any) -> None:
    key = sub.add_parser("key", help="manage key-encryption keys")
    ksub = key.add_subparsers(dest="key_cmd", required=True)
    for name in ("create", "rotate"):
        k = ksub.add_parser(name)
        k.add_argument("name", help="key URI, e.g. prod-kek or local:prod-kek")
        k.add_argument("--json", action="store_true")
    for name in ("disable", "enable"):
        k = ksub.add_parser(name)
        k.add_argument("name")
        k.add_argument("--version", type=int, required=True)
        k.add_argument("--json", action="store_true")
    k = ksub.add_parser("destroy", help="crypto-shred a key version (or all); after a waiting period unless --now")
    k.add_argument("name")
    k.add_argument("--version", type=int)
    k.add_argument("--yes", action="store_true", help="confirm without a prompt")
    k.add_argument("--after", default="7d", help="waiting period before the material is erased (default 7d)")
    k.add_argument("--now", action="store_true", help="erase at once (a compromised key)")
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("min-version", help="versions below this stop decrypting (local keys; like Transit's)")
    k.add_argument("name")
    k.add_argument("version", type=int)
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("cancel-destroy", help="undo a scheduled destruction (versions come back disabled)")
    k.add_argument("name")
    k.add_argument("--version", type=int)
    k.add_argument("--json", action="store_true")
    ksub.add_parser("purge", help="erase local key versions whose waiting period is over")
    k = ksub.add_parser("list", help="keys with versions, environments and age against the rotation policy")
    k.add_argument("name", nargs="?", help="one key URI (needed for pkcs11:)")
    k.add_argument("--scheme", default="local", help="provider to list (local, transit)")
    k.add_argument("--json", action="store_true")
    key.set_defaults(fn=cmd_key)


def add_rotate(sub: Any) -> None:
    ro = sub.add_parser("rotate", help="rotate a KEK when due and rewrap every artifact under PATHs (resumable)")
    ro.add_argument("paths", nargs="+")
    ro.add_argument("--key", required=True)
    ro.add_argument(
        "--older-than", help="rotate if the newest version is older than this (90d, 12h); default: the policy"
    )
    ro.add_argument("--force", action="store_true", help="rotate now whatever the age")
    ro.add_argument(
        "--keep-recipient",
        action="append",
        metavar="URI",
        help="confirm another stored recipient that is not among the configured keys (repeatable)",
    )
    ro.set_defaults(fn=cmd_rotate)


def add_recovery(sub: Any) -> None:
    rc = sub.add_parser("recovery", help="k-of-n recovery of the local keystore (Shamir shares)")
    rsub = rc.add_subparsers(dest="recovery_cmd", required=True)
    rs = rsub.add_parser("split", help="split the keystore's root key into shares")
    rs.add_argument("--shares", type=int, required=True)
    rs.add_argument("--threshold", type=int, required=True)
    rs.add_argument("--out", required=True, help="folder for the share files (0600); move each to its custodian")
    rs.add_argument("--force", action="store_true", help="replace share files of an earlier split in --out")
    rcm = rsub.add_parser("combine", help="restore access from shares and set a new passphrase")
    rcm.add_argument("share_files", nargs="+", help="files holding shares, one per line ('-' for stdin)")
    rr = rsub.add_parser(
        "rotate-root", help="new root key and new KEK versions: old shares and keystore copies stop opening it"
    )
    rr.add_argument(
        "--new-passphrase",
        action="store_true",
        help=f"also set a new passphrase (from ${keystore.NEW_PASSPHRASE_ENV} or a prompt)",
    )
    rc.set_defaults(fn=cmd_recovery)
