"""``modelseal access``, ``approvals``, ``approve``, ``deny`` and ``mfa``: bindings, grants,
break-glass, two-person approvals, step-up MFA and the access review (docs/access.md).

Every command but ``access bootstrap`` talks to ``modelseal serve`` through
``registry.apiclient.ApiClient`` (pinned mutual TLS, the caller's certificate is who acts).
A TOTP code is read from the terminal (``getpass``) or, when stdin is not a terminal, from
one line of stdin: never from argv, where every user of the host could read it.
``access bootstrap`` writes the first security-officer bindings straight into a fresh
server's governance database, and refuses once any active officer binding exists.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any

from modelseal.cli import holds
from modelseal.cli.common import escape, fmt_time
from modelseal.errors import GovernanceError
from modelseal.governance import model
from modelseal.keys.service import KeyService

ROLES = model.ROLES


def _duration(text: str) -> int:
    from modelseal.governance.approvals import parse_duration

    try:
        return int(parse_duration(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_otp(prompt: str = "OTP code: ") -> str:
    """A TOTP code from the terminal, or one line of stdin when it is not a terminal."""
    if sys.stdin is not None and sys.stdin.isatty():
        code = getpass.getpass(prompt)
    else:
        code = (sys.stdin.readline() if sys.stdin is not None else "").strip()
    if not code:
        raise GovernanceError("no OTP code given (type it, or pipe one line on stdin)")
    return code


def _client(args: argparse.Namespace) -> Any:
    from modelseal.registry.apiclient import ApiClient

    return ApiClient.from_settings(getattr(args, "server", None))


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    with _client(args) as api:
        out: dict[str, Any] = api.call(method, path, body)
        return out


def _when(t: object) -> str:
    return fmt_time(float(t)) if isinstance(t, int | float) and not isinstance(t, bool) else "-"


def _print_binding(b: dict[str, Any]) -> None:
    line = f"{escape(b.get('id'))}  {escape(b.get('identity'))}  {escape(b.get('role'))}@{escape(b.get('env'))}"
    line += f"  {escape(b.get('kind'))}  until {_when(b.get('expires'))}  last used {_when(b.get('last_used'))}"
    if b.get("reason"):
        line += f"  ({escape(b.get('reason'))})"
    print(line)


# -- access --------------------------------------------------------------------------------


def cmd_bind(args: argparse.Namespace, svc: KeyService) -> int:
    body = {"identity": args.identity, "role": args.role, "for": args.expires, "reason": args.reason or ""}
    if args.env:
        body["env"] = args.env
    body["otp"] = read_otp()
    _print_binding(_call(args, "POST", "access/bindings", body))
    return 0


def cmd_grant(args: argparse.Namespace, svc: KeyService) -> int:
    body = {"identity": args.to, "role": args.role, "for": getattr(args, "for"), "reason": args.reason}
    if args.env:
        body["env"] = args.env
    body["otp"] = read_otp()
    _print_binding(_call(args, "POST", "access/grants", body))
    return 0


def cmd_unbind(args: argparse.Namespace, svc: KeyService) -> int:
    from urllib.parse import quote

    b = _call(args, "DELETE", f"access/bindings/{quote(args.id, safe='')}", {"otp": read_otp()})
    print(f"removed binding {escape(b.get('id'))} ({escape(b.get('identity'))} {escape(b.get('role'))})")
    return 0


def cmd_list(args: argparse.Namespace, svc: KeyService) -> int:
    rows = _call(args, "GET", "access/bindings" + ("?all=1" if args.all else "")).get("bindings", [])
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for b in rows if isinstance(rows, list) else []:
        _print_binding(b)
    return 0


def cmd_break_glass(args: argparse.Namespace, svc: KeyService) -> int:
    body = {"role": args.role, "for": getattr(args, "for"), "reason": args.reason}
    if args.env:
        body["env"] = args.env
    body["otp"] = read_otp()
    _call(args, "POST", "access/break-glass", body)  # 202: ApprovalRequired (exit 18) names the request
    return 0


def cmd_review(args: argparse.Namespace, svc: KeyService) -> int:
    rv = _call(args, "GET", "access/review")
    if args.json:
        print(json.dumps(rv, indent=2, sort_keys=True))
    else:
        s = rv.get("summary", {})
        print(f"access review {escape(rv.get('digest'))} at {_when(rv.get('generated'))}")
        print(f"  {s.get('expired', 0)} expired, {s.get('unused', 0)} unused, {s.get('sod-conflict', 0)} SoD conflicts")
        if "held" in s:
            print(f"  {s.get('held', 0)} held (suspended pending review)")
        for e in rv.get("entries", []):
            flags = ",".join(escape(f) for f in e.get("flags", [])) or "ok"
            clash = ",".join(escape(c) for c in e.get("conflicts_with", []))
            _print_binding(e)
            print(f"    flags: {flags}" + (f" (with {clash})" if clash else ""))
            for h in e.get("holds", []) if isinstance(e.get("holds"), list) else []:
                if not isinstance(h, dict):
                    continue
                who = "" if h.get("identity") == e.get("identity") else f" for {escape(h.get('identity'))}"
                print(f"    suspended{who} pending review: hold {escape(h.get('id'))}")
    if args.attest:
        _attest(args, str(rv.get("digest", "")))
    return 0


def _attest(args: argparse.Namespace, digest: str) -> None:
    from modelseal.governance import review

    with _client(args) as api:
        key, me = review.load_reviewer(api.transport.tls_dir)
        body = {"digest": digest, "signature": review.sign(key, digest, me)}
        del key
        a = api.call("POST", "access/attestations", body)
    print(f"attested review {escape(digest)} as {escape(me)} ({escape(a.get('id'))})", file=sys.stderr)


def cmd_bootstrap(args: argparse.Namespace, svc: KeyService) -> int:
    from modelseal.governance.model import Binding
    from modelseal.governance.store import GovStore, open_target
    from modelseal.pki.identity import parse

    store = GovStore.open(open_target(Path(args.data), args.db))
    try:
        now = time.time()
        if store.any_active("security-officer", now):
            raise GovernanceError("a security officer is bound already: bootstrap is for a fresh server only")
        for officer in args.officer:
            ident = parse(officer)
            if ident.kind != "user":
                raise GovernanceError(f"{officer} is not a user identity: officers use MFA, services cannot")
            b = store.bind(Binding("", ident.uri, "security-officer", ident.env, now + args.expires), "bootstrap", now)
            print(f"bound {escape(b.pattern)} as security-officer in {b.env} until {fmt_time(b.expires)} ({b.id})")
    finally:
        store.close()
    return 0


# -- approvals and MFA -----------------------------------------------------------------------


def _print_approval(a: dict[str, Any], file: Any = None) -> None:
    res, votes = a.get("resource"), a.get("approvals")
    res = res if isinstance(res, dict) else {}
    votes = votes if isinstance(votes, list) else []
    print(
        f"{escape(a.get('id'))}  {escape(a.get('action'))} {escape(res.get('type'))}:{escape(res.get('id'))}"
        f"  by {escape(a.get('requester'))}  {escape(a.get('state'))} {len(votes)}/{escape(a.get('needs'))}"
        f"  expires {_when(a.get('expires'))}  params {escape(json.dumps(a.get('params'), sort_keys=True))}",
        file=file or sys.stdout,
    )


def cmd_approvals(args: argparse.Namespace, svc: KeyService) -> int:
    rows = _call(args, "GET", "approvals" + ("?all=1" if args.all else "")).get("approvals", [])
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for a in rows if isinstance(rows, list) else []:
        _print_approval(a)
    return 0


def _decide(args: argparse.Namespace, verdict: str) -> int:
    from urllib.parse import quote

    with _client(args) as api:
        pending = api.call("GET", "approvals").get("approvals", [])
        shown = [a for a in pending if isinstance(a, dict) and a.get("id") == args.id]
        if shown:  # what is being decided, shown before the code is asked for
            _print_approval(shown[0], file=sys.stderr)
        body: dict[str, Any] = {"otp": read_otp()}
        if verdict == "deny":
            body["reason"] = args.reason or ""
        a = api.call("POST", f"approvals/{quote(args.id, safe='')}/{verdict}", body)
    _print_approval(a)
    if a.get("state") == "failed":
        raise GovernanceError(f"approval {escape(a.get('id'))} ran and failed: {escape(a.get('error'))}")
    if a.get("state") == "done":
        print(f"ran {escape(a.get('action'))}: {escape(json.dumps(a.get('result'), sort_keys=True))}")
    return 0


def cmd_approve(args: argparse.Namespace, svc: KeyService) -> int:
    return _decide(args, "approve")


def cmd_deny(args: argparse.Namespace, svc: KeyService) -> int:
    return _decide(args, "deny")


def cmd_mfa_enroll(args: argparse.Namespace, svc: KeyService) -> int:
    out = _call(args, "POST", "mfa/enroll", {})
    # The secret is shown once, here, on stdout: add it to an authenticator app, then confirm.
    print(out.get("uri", ""))
    print("add this to an authenticator app, then run: modelseal mfa confirm", file=sys.stderr)
    return 0


def cmd_mfa_confirm(args: argparse.Namespace, svc: KeyService) -> int:
    _call(args, "POST", "mfa/confirm", {"otp": read_otp("first OTP code: ")})
    print("MFA enrolment confirmed", file=sys.stderr)
    return 0


# -- the parsers -----------------------------------------------------------------------------


def _server(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="HOST:PORT", help="the modelseal serve to ask (default: [broker]/[registry])")


def add_access(sub: Any) -> None:
    p = sub.add_parser("access", help="bindings, grants, break-glass and access reviews (docs/access.md)")
    s = p.add_subparsers(dest="access_cmd", required=True)
    b = s.add_parser("bind", help="bind an identity (or pattern) to a role in an environment (MFA)")
    b.add_argument("identity", help="spiffe://DOMAIN/ENV/KIND/NAME, segments may be *")
    b.add_argument("--role", required=True, choices=ROLES)
    b.add_argument("--env", help="default: the server's")
    b.add_argument("--expires", required=True, type=_duration, metavar="DURATION", help="e.g. 90d (at most 366d)")
    b.add_argument("--reason", help="why (kept in the binding)")
    b.set_defaults(fn=cmd_bind)
    u = s.add_parser("unbind", help="remove a binding (MFA)")
    u.add_argument("id")
    u.set_defaults(fn=cmd_unbind)
    ls = s.add_parser("list", help="the bindings in force")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--all", action="store_true", help="expired ones too")
    ls.set_defaults(fn=cmd_list)
    g = s.add_parser("grant", help="temporary access that expires by itself (MFA)")
    g.add_argument("--role", required=True, choices=ROLES)
    g.add_argument("--to", required=True, metavar="IDENTITY")
    g.add_argument("--env", help="default: the server's")
    g.add_argument("--for", required=True, type=_duration, metavar="DURATION", help="e.g. 2h (at most 7d)")
    g.add_argument("--reason", required=True)
    g.set_defaults(fn=cmd_grant)
    bg = s.add_parser("break-glass", help="ask for emergency access: needs two officers' approval (MFA)")
    bg.add_argument("--role", required=True, choices=ROLES)
    bg.add_argument("--env", help="default: the server's")
    bg.add_argument("--for", required=True, type=_duration, metavar="DURATION", help="e.g. 4h (the server's limit)")
    bg.add_argument("--reason", required=True)
    bg.set_defaults(fn=cmd_break_glass)
    r = s.add_parser("review", help="every binding and grant with its last use and flags")
    r.add_argument("--json", action="store_true")
    r.add_argument("--attest", action="store_true", help="sign the review with your certificate's key, as evidence")
    r.set_defaults(fn=cmd_review)
    for q in (b, u, ls, g, bg, r):
        _server(q)
    holds.add_holds(s, _server, read_otp)
    boot = s.add_parser("bootstrap", help="a fresh server's first security officers (local, no server)")
    boot.add_argument("--data", required=True, metavar="DIR", help="the server's --data")
    boot.add_argument("--db", metavar="URL", help="the server's --db")
    boot.add_argument("--officer", required=True, action="append", metavar="IDENTITY", help="a user identity; repeat")
    boot.add_argument("--expires", type=_duration, default=90 * 86400, metavar="DURATION", help="default 90d")
    boot.set_defaults(fn=cmd_bootstrap)


def add_approvals(sub: Any) -> None:
    p = sub.add_parser("approvals", help="two-person approval requests")
    s = p.add_subparsers(dest="approvals_cmd", required=True)
    ls = s.add_parser("list", help="the requests waiting for approval")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--all", action="store_true", help="recent requests in any state")
    _server(ls)
    ls.set_defaults(fn=cmd_approvals)
    a = sub.add_parser("approve", help="approve a request (a security officer, with MFA)")
    a.add_argument("id")
    _server(a)
    a.set_defaults(fn=cmd_approve)
    d = sub.add_parser("deny", help="deny a request for good (with MFA)")
    d.add_argument("id")
    d.add_argument("--reason")
    _server(d)
    d.set_defaults(fn=cmd_deny)


def add_mfa(sub: Any) -> None:
    p = sub.add_parser("mfa", help="step-up MFA (TOTP) for your user identity")
    s = p.add_subparsers(dest="mfa_cmd", required=True)
    e = s.add_parser("enroll", help="make a TOTP secret: prints its otpauth:// URI once")
    _server(e)
    e.set_defaults(fn=cmd_mfa_enroll)
    c = s.add_parser("confirm", help="activate the enrolment with a first code")
    _server(c)
    c.set_defaults(fn=cmd_mfa_confirm)


__all__ = ["add_access", "add_approvals", "add_mfa", "read_otp"]
