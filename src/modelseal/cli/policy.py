"""``modelseal policy``: check an artifact against the encryption standards, and the
server's policy versions (propose, list, show, activate) over its mTLS API.

``policy check PATH|REF`` judges a sealed file or folder, or a registry reference
(``[oci://]HOST:PORT/REPO:TAG|@sha256:...``, pulled without verification into a temporary
folder of the registry cache, then verified here), under this host's policy
(``governance.localpolicy``): one line per standard, exit 0 when every one passes, 8 on
a violation. It always enforces, whatever ``[governance] standards`` says for seal. The
server commands talk to ``registry.apiclient``; OTP codes are read from the terminal, or
one line of stdin, never from argv.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from modelseal.cli.access import read_otp
from modelseal.cli.common import escape, fmt_time
from modelseal.errors import ApprovalRequired, GovernanceError, StandardViolation, StorageError
from modelseal.governance import localpolicy, standards
from modelseal.governance.cedar import MAX_POLICY_TEXT, Engine, PolicySet
from modelseal.governance.versions import check_digest
from modelseal.keys.service import KeyService
from modelseal.recipes.context import check_keys_apart, trust_policy
from modelseal.registry import settings, transfer
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.reference import OCI_SCHEME, parse_reference
from modelseal.signing.trust import TrustPolicy, load_policy
from modelseal.util.files import read_limited, remove_path


def _is_reference(target: str) -> bool:
    if target.startswith(OCI_SCHEME):
        return True
    if Path(target).exists() or "/" not in target or ":" not in target.split("/", 1)[0]:
        return False
    try:
        parse_reference(target)
    except ValueError:
        return False
    return True


def _facts(args: argparse.Namespace, svc: KeyService, policy: TrustPolicy | None) -> standards.ArtifactFacts:
    if not _is_reference(args.target):
        return standards.facts_of(args.target, svc, policy, args.env)
    root = settings.cache_dir(settings.load())
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".policy-check-", dir=root))
    except OSError as e:
        raise StorageError(f"cannot make a folder in the registry cache {root}: {e.strerror}") from None
    try:
        check_keys_apart(tmp)
        # Pulled without verification: the signatures are judged below, by the standard.
        pulled = transfer.pull(args.target, tmp / "artifact", verify=False)
        return standards.facts_of(pulled.path, svc, policy, args.env)
    finally:
        remove_path(tmp)


def cmd_check(args: argparse.Namespace, svc: KeyService) -> int:
    policies = localpolicy.client_policy()
    trust = load_policy(args.trust) if args.trust else trust_policy(svc)
    facts = _facts(args, svc, trust)
    report = standards.check(facts, Engine(policies), "artifact.check")
    d = report.decision
    if args.json:
        doc = {
            "artifact": args.target,
            "env": facts.env,
            "artifact_env": facts.artifact_env,
            "allowed": d.allowed,
            "reason": d.reason,
            "policies": list(d.policies),
            "exception": d.exception,
            "expired": list(d.expired),
            "policy": policies.digest,
            "findings": [vars(f) for f in report.findings],
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for f in report.findings:
            print(escape(f.line()))
        verdict = "passes" if d.allowed else "breaks"
        print(f"{escape(args.target)} {verdict} the standards of policy {policies.digest}")
    return 0 if d.allowed else StandardViolation.exit_code


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient.from_settings(args.server)


def cmd_propose(args: argparse.Namespace, svc: KeyService) -> int:
    del svc
    path = Path(args.file)
    try:
        raw = read_limited(path, MAX_POLICY_TEXT, GovernanceError, f"the policy file {path}", regular=True)
    except FileNotFoundError:
        raise GovernanceError(f"the policy file {path} does not exist") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GovernanceError(f"the policy file {path} is not UTF-8") from None
    ps = PolicySet.parse(text, str(path))  # refused here, before any code is asked for
    otp = read_otp(f"OTP code for policy.propose {ps.digest[:19]}: ")
    with _client(args) as api:
        doc = api.call("POST", "policy/versions", {"text": text, "note": args.note, "otp": otp})
    digest = check_digest(str(doc.get("digest", "")))
    print(f"proposed {digest} ({len(ps.ids)} policies, {len(ps.exceptions)} exceptions); it takes effect only")
    print(f"once approved: modelseal policy activate {digest}")
    return 0


def cmd_list(args: argparse.Namespace, svc: KeyService) -> int:
    del svc
    with _client(args) as api:
        doc = api.call("GET", "policy/versions")
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    rows = doc.get("versions", [])
    for v in rows if isinstance(rows, list) else []:
        mark = "*" if v.get("active") else " "
        when = fmt_time(float(v.get("proposed", 0)))
        line = f"{mark} {v.get('digest')} {when} {v.get('proposer')} {v.get('note') or ''}".rstrip()
        print(escape(line))
    print(f"active: {escape(doc.get('active', '?'))}")
    return 0


def cmd_show(args: argparse.Namespace, svc: KeyService) -> int:
    del svc
    path = "policy" if args.digest is None else f"policy/versions/{check_digest(args.digest)}"
    with _client(args) as api:
        doc = api.call("GET", path)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"# {escape(doc.get('digest', '?'))} ({len(doc.get('ids', []))} policies)")
    for line in str(doc.get("text", "")).splitlines():
        print(escape(line))
    return 0


def cmd_activate(args: argparse.Namespace, svc: KeyService) -> int:
    del svc
    digest = check_digest(args.digest)
    otp = read_otp(f"OTP code for policy.activate {digest[:19]}: ")
    with _client(args) as api:
        try:
            doc = api.call("POST", "policy/activate", {"digest": digest, "otp": otp})
        except ApprovalRequired as e:
            print(escape(str(e), backslash=False))  # names the approval request officers approve
            return e.exit_code
    print(f"activated {escape(doc.get('digest', digest))}")
    return 0


def _server(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="HOST:PORT", help="the modelseal server (default: [broker] or [registry])")


def add_policy(sub: Any) -> None:
    p = sub.add_parser("policy", help="encryption standards and policy versions (docs/governance.md)")
    psub = p.add_subparsers(dest="policy_cmd", required=True)
    c = psub.add_parser(
        "check",
        help="check a sealed artifact against the encryption standards (exit 8 on a violation)",
        description="One line per standard. REF is [oci://]HOST:PORT/REPO:TAG or @sha256:...; it is pulled "
        "into the registry cache for the check and removed after.",
    )
    c.add_argument("target", metavar="PATH|REF", help="a sealed file or folder, or a registry reference")
    c.add_argument("--env", metavar="ENV", help="the environment to judge it for (default: the one it is sealed for)")
    c.add_argument("--trust", metavar="POLICY", help="the trust policy for signatures (default: the one in force)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_check)
    pr = psub.add_parser("propose", help="propose a policy version to the server (step-up MFA)")
    pr.add_argument("file", metavar="FILE", help="a Cedar policy file")
    pr.add_argument("--note", default="", help="why (kept with the version)")
    _server(pr)
    pr.set_defaults(fn=cmd_propose)
    ls = psub.add_parser("list", help="the server's policy versions (* is active)")
    ls.add_argument("--json", action="store_true")
    _server(ls)
    ls.set_defaults(fn=cmd_list)
    sh = psub.add_parser("show", help="the active policy, or one version by digest")
    sh.add_argument("digest", nargs="?", metavar="DIGEST")
    sh.add_argument("--json", action="store_true")
    _server(sh)
    sh.set_defaults(fn=cmd_show)
    ac = psub.add_parser("activate", help="ask for a version to be activated (two-person: prints the approval id)")
    ac.add_argument("digest", metavar="DIGEST")
    _server(ac)
    ac.set_defaults(fn=cmd_activate)


__all__ = ["add_policy"]
