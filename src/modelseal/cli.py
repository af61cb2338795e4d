"""The ``modelseal`` command line: a thin shell over the recipes in ``modelseal.api``.

Every error is one line on stderr and a documented exit code (``errors.py``,
docs/cli.md); no traceback unless ``MODELSEAL_DEBUG=1``. Progress goes to
stderr, only when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import api, clisign, inspection, keystore, rekey
from .audit import AuditEvent
from .errors import ModelsealError
from .fsutil import write_atomic
from .keys import KeyService
from .providers import KeyInfo, parse_key_uri
from .signing import load_signer
from .trust import load_policy


class ProgressBar:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(1.0, self.done / self.total)
            rate = self.done / max(now - self._start, 1e-6) / 1e6
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {rate:8.1f} MB/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def _context(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ValueError(f"--context takes KEY=VALUE, got {pair!r}")
        if k in out:
            raise ValueError(f"--context key {k!r} given twice")
        out[k] = v
    return out


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True))
        return
    for k, v in obj.items():
        print(f"{k:18} {v if not isinstance(v, dict | list) else json.dumps(v)}")


def _fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_row(info: KeyInfo, svc: KeyService | None = None) -> dict[str, Any]:
    now = time.time()
    envs = sorted(svc.config.environments_of(info.uri)) if svc is not None else []
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
                "created": _fmt_time(v.created),
                "age_days": round((now - v.created) / 86400, 1),
            }
            for v in info.versions
        ],
    }


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
                f"{r['key']:40} v{r['latest_version']:<3} {latest['state']:9} env {envs:10} "
                f"age {latest['age_days']}d / policy {r['rotate_after_days']}d {due}"
            )
        return 0
    if args.key_cmd == "create":
        info = svc.create(args.name)
    elif args.key_cmd == "rotate":
        info = svc.rotate(args.name)
    elif args.key_cmd in ("disable", "enable"):
        info = svc.set_state(args.name, args.version, "disabled" if args.key_cmd == "disable" else "active")
    elif args.key_cmd == "min-version":
        from .providers.local import LocalProvider

        if parse_key_uri(args.name).scheme != "local":
            raise ModelsealError("min-version is for local keys; Transit keys: key disable --version N")
        info = LocalProvider().set_min_decryption_version(parse_key_uri(args.name).name, args.version)
        svc.sink.emit(AuditEvent("min-version", parse_key_uri(args.name).uri, "ok", args.version))
    elif args.key_cmd == "cancel-destroy":
        info = svc.cancel_destroy(args.name, args.version)
    elif args.key_cmd == "purge":
        from .providers.local import LocalProvider

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
        after = 0.0 if args.now else _days(args.after) * 86400
        if not args.now and not 0 < after < float("inf"):
            raise ValueError("--after must be a positive duration (use --now to erase at once)")
        info = svc.destroy(args.name, args.version, after=after)
        if after:
            when = _fmt_time(time.time() + after)
            print(f"{what} stops working now and will be erased after {when} (key cancel-destroy undoes it)")
    _print(_key_row(info, svc), args.json)
    return 0


def cmd_seal(args: argparse.Namespace, svc: KeyService) -> int:
    bar = ProgressBar(_size_of(Path(args.src)), "seal")
    try:
        res = api.seal(
            args.src,
            args.dst,
            key=args.key,
            context=_context(args.context),
            env=args.env,
            project=args.project,
            force=args.force,
            progress=bar,
            keys=svc,
            sign_key=load_signer(args.sign_key) if args.sign_key else None,
            name=args.name,
        )
    finally:
        bar.close()
    print(f"sealed {res.files} file(s), {res.bytes} bytes -> {res.path} (artifact {res.artifact_id[:16]})")
    if res.signature:
        print(f"signed (signature {res.signature[:16]})")
    return 0


def cmd_unseal(args: argparse.Namespace, svc: KeyService) -> int:
    bar = ProgressBar(_size_of(Path(args.src)), "unseal")
    try:
        verify = load_policy(args.trust) if args.trust else None
        out = api.unseal(
            args.src, args.dst, force=args.force, progress=bar, keys=svc, verify=verify, expect_name=args.name
        )
    finally:
        bar.close()
    print(f"unsealed -> {out}")
    return 0


def cmd_inspect(args: argparse.Namespace, svc: KeyService) -> int:
    _print(inspection.inspect(args.path, contents=args.contents, keys=svc), args.json)
    return 0


def cmd_rewrap(args: argparse.Namespace, svc: KeyService) -> int:
    for p in args.paths:
        res = rekey.rewrap(p, key=args.key or None, keys=svc)
        print(f"rewrapped {res.path} -> {', '.join(res.recipients)} (slot generation {res.generation})")
    return 0


def cmd_reencrypt(args: argparse.Namespace, svc: KeyService) -> int:
    for p in args.paths:
        res = rekey.reencrypt(p, key=args.key or None, keys=svc)
        print(f"re-encrypted {res.path} under a fresh data key (artifact {res.artifact_id[:16]})")
    return 0


def cmd_audit(args: argparse.Namespace, svc: KeyService) -> int:
    from .auditlog import AuditLogError, MerkleAuditLog

    log = MerkleAuditLog(os.environ.get("MODELSEAL_AUDIT_URL") or keystore.modelseal_home() / "audit.db")
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
                f"{e['entry']:>6} {_fmt_time(e['time'])} {e['actor']:10} {e['operation']:8} {e['key']}{version}"
                f"{art} -> {e['result']}"
            )
    return 0


def _days(text: str) -> float:
    units = {"d": 1.0, "h": 1 / 24, "w": 7.0}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError
        return value
    except ValueError:
        raise ValueError(f"--older-than takes a duration like 90d, 12h or 2w, got {text!r}") from None


def cmd_rotate(args: argparse.Namespace, svc: KeyService) -> int:
    from .rotation import rotate

    older = _days(args.older_than) if args.older_than else None
    report = rotate(
        args.key,
        [Path(p) for p in args.paths],
        older_than_days=older,
        force=args.force,
        keys=svc,
        progress=lambda name: print(f"rewrapped {name}", file=sys.stderr) if sys.stderr.isatty() else None,
    )
    what = "rotated to" if report.rotated else "not due; newest is"
    print(
        f"{report.key}: {what} v{report.latest_version}; rewrapped {len(report.rewrapped)}, "
        f"already current {len(report.up_to_date)}, not using the key {report.not_using_key}, "
        f"failed {len(report.failed)}"
    )
    for name, why in report.failed:
        print(f"failed: {name}: {why}", file=sys.stderr)
    if report.failed:
        raise ModelsealError(f"{len(report.failed)} artifact(s) were not rewrapped (they still open); run rotate again")
    return 0


def cmd_recovery(args: argparse.Namespace, svc: KeyService) -> int:
    if args.recovery_cmd == "split":
        shares = keystore.split_root(args.shares, args.threshold)
        out = Path(args.out)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i, share in enumerate(shares, 1):
            # Each share is a secret: written 0600, never printed. Hand each to its custodian.
            write_atomic(out / f"share-{i}-of-{len(shares)}.txt", (share + "\n").encode(), mode=0o600)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelseal", description="Encrypt and govern ML model artifacts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init", help="create the local keystore under $MODELSEAL_HOME").set_defaults(fn=cmd_init)

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
    s.set_defaults(fn=cmd_seal)

    u = sub.add_parser("unseal", help="decrypt a sealed file or folder to plaintext")
    u.add_argument("src")
    u.add_argument("dst")
    u.add_argument("--force", action="store_true")
    u.add_argument("--trust", metavar="TRUST.toml", help="verify signatures first (default: configured policy)")
    u.add_argument("--name", help="require this signed artifact name (with a trust policy)")
    u.set_defaults(fn=cmd_unseal)
    clisign.register(sub)

    i = sub.add_parser("inspect", help="show a sealed artifact's public header")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.add_argument("--contents", action="store_true", help="also unwrap the key and show names, sizes, digests")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("rewrap", help="re-wrap data keys under the newest KEK version (header only)")
    r.add_argument("paths", nargs="+")
    r.add_argument("--key", action="append", help="re-wrap to this key instead (repeatable)")
    r.set_defaults(fn=cmd_rewrap)

    ro = sub.add_parser("rotate", help="rotate a KEK when due and rewrap every artifact under PATHs (resumable)")
    ro.add_argument("paths", nargs="+")
    ro.add_argument("--key", required=True)
    ro.add_argument(
        "--older-than", help="rotate if the newest version is older than this (90d, 12h); default: the policy"
    )
    ro.add_argument("--force", action="store_true", help="rotate now whatever the age")
    ro.set_defaults(fn=cmd_rotate)

    rc = sub.add_parser("recovery", help="k-of-n recovery of the local keystore (Shamir shares)")
    rsub = rc.add_subparsers(dest="recovery_cmd", required=True)
    rs = rsub.add_parser("split", help="split the keystore's root key into shares")
    rs.add_argument("--shares", type=int, required=True)
    rs.add_argument("--threshold", type=int, required=True)
    rs.add_argument("--out", required=True, help="folder for the share files (0600); move each to its custodian")
    rcm = rsub.add_parser("combine", help="restore access from shares and set a new passphrase")
    rcm.add_argument("share_files", nargs="+", help="files holding shares, one per line ('-' for stdin)")
    rc.set_defaults(fn=cmd_recovery)

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

    e = sub.add_parser("reencrypt", help="re-seal under a fresh data key")
    e.add_argument("paths", nargs="+")
    e.add_argument("--key", action="append")
    e.set_defaults(fn=cmd_reencrypt)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args, KeyService()))
    except ModelsealError as e:
        print(f"modelseal: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:
        print(f"modelseal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modelseal: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MODELSEAL_DEBUG") == "1":
            raise
        print(f"modelseal: internal error ({type(e).__name__}); set MODELSEAL_DEBUG=1 for details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
