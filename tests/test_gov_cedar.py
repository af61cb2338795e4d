"""Cedar decisions: the shipped policy set, policy by policy (allow and deny), and the
engine's rules: default deny, forbid over permit, fail closed, one-line reasons naming ids."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import cedarpy
import pytest

from modelseal.errors import GovernanceError
from modelseal.governance import model
from modelseal.governance.cedar import Engine, PolicySet, default_policy
from modelseal.governance.model import Binding, Decision, Principal, Request, Resource

NOW = 1_800_000_000.0
DOMAIN = "example.org"


def who(
    roles: dict[str, tuple[str, ...]] | None = None,
    env: str = "prod",
    kind: str = "user",
    name: str = "alice",
    glass: dict[str, tuple[str, ...]] | None = None,
    expires: float = NOW + 3600,
) -> Principal:
    ident = f"spiffe://{DOMAIN}/{env}/{kind}/{name}"
    bs = [Binding(f"b{n}", ident, role, e, expires) for n, (e, rs) in enumerate((roles or {}).items()) for role in rs]
    bs += [Binding(f"g{e}{r}", ident, r, e, expires, kind="break-glass") for e, rs in (glass or {}).items() for r in rs]
    return Principal(ident, env, kind, DOMAIN, tuple(bs))


def res(rtype: str, rid: str = "x", env: str = "prod", **attrs: object) -> Resource:
    return Resource(rtype, rid, {"env": env, **attrs})


ART = {
    "artifact_env": "prod",
    "schemes": ["transit"],
    "has_local": False,
    "signatures": 2,
    "threshold": 2,
    "has_trust": True,
    "kek_age_days": 10,
}


def artifact(**changes: object) -> Resource:
    return res("Artifact", "a1", **{**ART, **changes})


def engine(ps: PolicySet | None = None) -> Engine:
    return Engine(ps or default_policy(), now=lambda: NOW)


def decide(p: Principal, action: str, r: Resource, **ctx: object) -> Decision:
    return engine().decide(Request(p, action, r, ctx))


READER, PUBLISHER, KADMIN = who({"prod": ("reader",)}), who({"prod": ("publisher",)}), who({"prod": ("key-admin",)})
OFFICER, AUDITOR = who({"prod": ("security-officer",)}), who({"prod": ("auditor",)})
MFA = {"mfa": True}
KEY_CTX = {"artifact_env": "prod"}

Case = Callable[[], Decision]
CARELESS = '@id("careless") permit(principal, action == Action::"pull", resource);'


def careless(p: Principal, action: str) -> Decision:
    ps = PolicySet.parse(default_policy().text + CARELESS)
    return engine(ps).decide(Request(p, action, res("Repository", "team/m"), {}))


# Every shipped policy id: a request it allows (permits) or whose denial it names (forbids),
# and the counterpart: the same request refused (permits) or allowed (forbids).
CASES: dict[str, tuple[Case, Case]] = {
    "role-reader": (
        lambda: decide(READER, "key.unwrap", res("Key", "k"), **KEY_CTX),
        lambda: decide(PUBLISHER, "key.unwrap", res("Key", "k"), **KEY_CTX),
    ),
    "role-publisher": (
        lambda: decide(PUBLISHER, "push", res("Repository", "team/m")),
        lambda: decide(READER, "push", res("Repository", "team/m")),
    ),
    "role-key-admin": (
        lambda: decide(KADMIN, "key.rotate", res("Key", "k"), **MFA),
        lambda: decide(READER, "key.rotate", res("Key", "k"), **MFA),
    ),
    "role-security-officer": (
        lambda: decide(OFFICER, "access.bind", res("Governance", "bindings"), **MFA),
        lambda: decide(AUDITOR, "access.bind", res("Governance", "bindings"), **MFA),
    ),
    "role-auditor": (
        lambda: decide(AUDITOR, "audit.read", res("Audit", "log")),
        lambda: decide(READER, "audit.read", res("Audit", "log")),
    ),
    "role-break-glass": (
        lambda: decide(who({"prod": ("break-glass",)}), "pull", res("Repository", "team/m")),
        lambda: decide(who({"prod": ("break-glass",)}), "key.rotate", res("Key", "k"), **MFA),
    ),
    "self-cert-renew": (
        lambda: decide(READER, "cert.renew", res("Certificate", READER.identity)),
        lambda: decide(READER, "cert.renew", res("Certificate", "spiffe://example.org/prod/user/bob")),
    ),
    "self-mfa-enroll": (
        lambda: decide(who(), "mfa.enroll", res("Governance", "mfa")),
        lambda: decide(who(kind="service"), "mfa.enroll", res("Governance", "mfa")),
    ),
    "self-console-login": (
        lambda: decide(who(), "console.login", res("Governance", "console")),
        lambda: decide(who(kind="service"), "console.login", res("Governance", "console")),
    ),
    "self-break-glass-request": (
        lambda: decide(who(), "access.break-glass", res("Governance", "break-glass"), mfa=True, approved=True),
        lambda: decide(who(kind="service"), "access.break-glass", res("Governance", "break-glass"), approved=True),
    ),
    "std-artifact-base": (
        lambda: decide(who(), "artifact.push", artifact()),
        lambda: decide(who(), "artifact.push", res("Repository", "a1", **ART)),
    ),
    "role-metrics": (  # the scrape, and nothing else: not even the auditor's reads
        lambda: decide(who({"prod": ("metrics",)}), "metrics.read", res("Audit", "metrics")),
        lambda: decide(who({"prod": ("metrics",)}), "audit.read", res("Audit", "log")),
    ),
    "gov-env-boundary": (
        lambda: decide(who({"prod": ("reader",)}, env="dev"), "pull", res("Repository", "team/m")),
        lambda: decide(READER, "pull", res("Repository", "team/m")),
    ),
    "gov-key-env": (
        lambda: decide(READER, "key.unwrap", res("Key", "k"), artifact_env="dev"),
        lambda: decide(READER, "key.unwrap", res("Key", "k"), artifact_env="prod"),
    ),
    "gov-sod": (
        lambda: decide(who({"prod": ("publisher", "key-admin")}), "push", res("Repository", "team/m")),
        lambda: decide(who({"prod": ("publisher",), "dev": ("key-admin",)}), "push", res("Repository", "team/m")),
    ),
    "gov-key-admin-no-data": (  # whatever a careless permit added later says
        lambda: careless(who({"prod": ("key-admin",)}), "pull"),
        lambda: careless(who({"prod": ("auditor",)}), "pull"),
    ),
    "gov-step-up-mfa": (
        lambda: decide(KADMIN, "key.create", res("Key", "k")),
        lambda: decide(KADMIN, "key.create", res("Key", "k"), mfa=True),
    ),
    "gov-two-person": (
        lambda: decide(OFFICER, "policy.activate", res("Governance", "policy"), mfa=True),
        lambda: decide(OFFICER, "policy.activate", res("Governance", "policy"), mfa=True, approved=True),
    ),
    "gov-two-person-configured": (  # the decider sets two_person where [governance] two_person names the action
        lambda: decide(KADMIN, "key.rotate", res("Key", "k"), mfa=True, two_person=True),
        lambda: decide(KADMIN, "key.rotate", res("Key", "k"), mfa=True, two_person=True, approved=True),
    ),
    "std-prod-kms": (
        lambda: decide(who(), "artifact.seal", artifact(schemes=["transit", "local"], has_local=True)),
        lambda: decide(who(), "artifact.seal", artifact(schemes=["transit", "pkcs11", "awskms", "broker"])),
    ),
    "std-cryptoperiod": (
        lambda: decide(who(), "artifact.pull", artifact(kek_age_days=366)),
        lambda: decide(who(), "artifact.pull", artifact(kek_age_days=365)),
    ),
    "std-signatures": (
        lambda: decide(who(), "artifact.deploy", artifact(signatures=1)),
        lambda: decide(who(), "artifact.deploy", artifact(signatures=1, has_trust=False)),
    ),
    "std-tls13": (
        lambda: decide(who(), "artifact.push", artifact(), tls_version="TLSv1.2"),
        lambda: decide(who(), "artifact.push", artifact(), tls_version="TLSv1.3"),
    ),
}


def test_every_shipped_policy_is_exercised() -> None:
    assert set(CASES) == set(default_policy().ids)


@pytest.mark.parametrize("pid", sorted(CASES))
def test_shipped_policy_allows_and_denies(pid: str) -> None:
    ps = default_policy()
    first, second = CASES[pid][0](), CASES[pid][1]()
    if ps.policies[pid].effect == "permit":
        assert first.allowed and pid in first.policies, first
        assert not second.allowed and pid not in second.policies, second
    else:
        assert not first.allowed and pid in first.policies, first
        assert ps.policies[pid].reason in first.reason  # the forbid's @reason, in one line
        assert "\n" not in first.reason
        assert second.allowed, second


def test_the_mfa_and_two_person_forbids_list_the_model_actions() -> None:
    ps = default_policy()

    def actions(pid: str) -> set[str]:
        scope = ps.policies[pid].body["action"]
        return {e["id"] for e in scope.get("entities") or [scope["entity"]]}

    assert actions("gov-step-up-mfa") == set(model.MFA_REQUIRED)
    assert actions("gov-two-person") == set(model.TWO_PERSON)


def test_key_admin_never_unwraps_or_pulls_and_a_reader_never_rotates() -> None:
    for action, r in [("key.unwrap", res("Key", "k")), ("pull", res("Repository", "team/m"))]:
        d = decide(KADMIN, action, r, **KEY_CTX)
        assert not d.allowed and d.reason == f"no policy permits {action} on {r.type} for key-admin"
    d = decide(READER, "key.rotate", res("Key", "k"), mfa=True)
    assert not d.allowed and d.policies == () and d.reason == "no policy permits key.rotate on Key for reader"


def test_cross_environment_requests_are_denied() -> None:
    dev_identity = who({"prod": ("reader",)}, env="dev")
    d = decide(dev_identity, "key.unwrap", res("Key", "k"), **KEY_CTX)
    assert not d.allowed and d.policies == ("gov-env-boundary",)
    d = decide(READER, "pull", res("Repository", env="dev"))  # a prod reader has no role in dev
    assert not d.allowed and "for no role" in d.reason
    d = decide(READER, "key.unwrap", res("Key", "dev-kek", env="dev"), artifact_env="dev")
    assert not d.allowed


def test_separation_of_duties_is_checked_on_every_decision() -> None:
    both = who({"prod": ("reader", "key-admin")})  # a binding made before a policy change, say
    d = decide(both, "pull", res("Repository", "team/m"))
    assert not d.allowed and set(d.policies) == {"gov-sod", "gov-key-admin-no-data"}
    assert d.reason.startswith("denied by gov-key-admin-no-data (") and "separation of duties" in d.reason
    d = decide(both, "key.list", res("Key", "k"))  # even what either role alone may do
    assert not d.allowed and "gov-sod" in d.policies


def test_a_denial_by_forbid_needs_a_permit_first() -> None:
    """Denied only by the two-person rule means "permitted but for approvals" (what
    gov_api.queue_approval relies on); without any permit it is the default deny."""
    d = decide(READER, "policy.activate", res("Governance", "policy"), mfa=True)
    assert not d.allowed and d.policies == ()
    d = decide(OFFICER, "policy.activate", res("Governance", "policy"), mfa=True)
    assert d.policies == ("gov-two-person",)


def test_expired_bindings_and_other_identities_give_no_role() -> None:
    stale = who({"prod": ("reader",)}, expires=NOW - 1)
    assert not decide(stale, "pull", res("Repository")).allowed
    p = READER
    foreign = Principal("spiffe://example.org/prod/user/mallory", "prod", "user", DOMAIN, p.bindings)
    assert not decide(foreign, "pull", res("Repository")).allowed


def test_break_glass_is_flagged() -> None:
    d = decide(who({"prod": ("break-glass",)}), "pull", res("Repository", "team/m"))
    assert d.allowed and d.break_glass and "(break-glass)" in d.reason
    d = decide(who(glass={"prod": ("key-admin",)}), "key.rotate", res("Key", "k"), mfa=True)
    assert d.allowed and d.break_glass
    d = decide(who({"prod": ("key-admin",)}, glass={"prod": ("key-admin",)}), "key.rotate", res("Key"), mfa=True)
    assert d.allowed and not d.break_glass  # the role is also bound normally
    assert not decide(READER, "pull", res("Repository")).break_glass


def test_services_cannot_pass_step_up() -> None:
    svc = who({"prod": ("key-admin",)}, kind="service")
    d = decide(svc, "key.rotate", res("Key", "k"), mfa=True)
    assert not d.allowed and d.policies == ("gov-step-up-mfa",)


def test_an_evaluation_error_fails_closed() -> None:
    text = """
@id("p") permit(principal, action, resource);
@id("f") @reason("needs an owner") forbid(principal, action, resource) when { resource.owner != "x" };
"""
    d = engine(PolicySet.parse(text)).decide(Request(READER, "pull", res("Repository")))
    # Cedar alone skips the erroring forbid and allows:
    raw = cedarpy.PolicySet.from_str(text)
    ents = [{"uid": {"type": "Repository", "id": "x"}, "attrs": {"env": "prod"}, "parents": []}]
    req = {"principal": 'Principal::"a"', "action": 'Action::"pull"', "resource": 'Repository::"x"', "context": {}}
    assert cedarpy.is_authorized(req, raw, ents).allowed
    assert not d.allowed and "fail closed" in d.reason and d.policies == ()


def test_unknown_actions_types_and_injected_entities_are_denied() -> None:
    assert "unknown action" in decide(OFFICER, "policy.delete", res("Governance")).reason
    assert "unknown resource type" in decide(OFFICER, "policy.read", res("Bucket")).reason
    evil = Resource("Repository", "x", {"env": "prod", "owner": {"__entity": {"type": "Principal", "id": "a"}}})
    d = decide(READER, "pull", evil)
    assert not d.allowed and "cannot be decided" in d.reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("permit(principal, action, resource);", "has no @id"),
        ('@id("a") permit(principal, action, resource); @id("a") permit(principal, action, resource);', "twice"),
        ('@id("a") forbid(principal, action, resource);', "no @reason"),
        ('@id("a") permit(principal == ?principal, action, resource);', "templates"),
        ('@id("a b") permit(principal, action, resource);', "@id"),
        ('@id("a") @reason("x\\ny") forbid(principal, action, resource);', "printable"),
        ('@id("a") @standard("s") permit(principal, action, resource);', "marks a forbid"),
        ("permit(principal, action, resource", "does not parse"),
    ],
)
def test_bad_policy_texts_are_refused(text: str, message: str) -> None:
    with pytest.raises(GovernanceError, match=message):
        PolicySet.parse(text, "t.cedar")


def test_the_digest_is_the_sha256_of_the_text() -> None:
    import hashlib

    ps = default_policy()
    assert ps.digest == "sha256:" + hashlib.sha256(ps.text.encode()).hexdigest()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", ps.digest)


def test_the_scope_index_decides_as_the_whole_set() -> None:
    """Per-repository permits and scoped forbids: the index picks a sub-set per (action,
    resource); every decision must equal the one over the whole set."""
    rules = [
        f'@id("repo-{i}") permit(principal, action in [Action::"pull", Action::"push"], '
        f'resource == Repository::"team{i}/m") when {{ principal.roles.contains("reader") }};'
        for i in range(20)
    ]
    rules.append(
        '@id("deny-t3") @reason("frozen") forbid(principal, action == Action::"push", resource is Repository '
        'in Repository::"team3/m");'
    )
    rules.append('@id("keys") permit(principal, action, resource is Key) when { principal.roles.contains("x") };')
    text = default_policy().text + "\n".join(rules)
    fast, whole = engine(PolicySet.parse(text)), engine(WholeSet.parse(text))
    rng = random.Random(7)
    for _ in range(300):
        p = who({"prod": tuple(rng.sample(["reader", "x", "publisher", "key-admin"], 2))})
        r = res(rng.choice(["Repository", "Key"]), f"team{rng.randrange(25)}/m")
        req = Request(p, rng.choice(["pull", "push", "key.list", "key.unwrap"]), r, {"artifact_env": "prod"})
        got, want = fast.decide(req), whole.decide(req)
        assert (got.allowed, got.policies, got.reason) == (want.allowed, want.policies, want.reason), req
        assert got.allowed == cedar_itself(text, req), req  # Cedar's own rule over the real effects


def cedar_itself(text: str, req: Request) -> bool:
    """cedarpy's decision over the policy text as written (no index, no effect rewrite)."""
    from modelseal.governance.cedar import principal_attrs, roles_of

    p, r = req.principal, req.resource
    ents = [
        {
            "uid": {"type": "Principal", "id": p.identity},
            "attrs": principal_attrs(p, roles_of(p, "prod", NOW)),
            "parents": [],
        },
        {"uid": {"type": r.type, "id": r.id}, "attrs": {**r.attrs, "id": r.id}, "parents": []},
    ]
    ctx = {"mfa": False, "mfa_age": -1, "approved": False, "approvals": 0, "anomaly": 0, "now": int(NOW), **req.context}
    request = {
        "principal": {"type": "Principal", "id": p.identity},
        "action": {"type": "Action", "id": req.action},
        "resource": {"type": r.type, "id": r.id},
        "context": ctx,
    }
    return bool(cedarpy.is_authorized(request, _REAL.setdefault(text, cedarpy.PolicySet.from_str(text)), ents).allowed)


_REAL: dict[str, object] = {}


class WholeSet(PolicySet):
    """No index: every request is evaluated against every policy."""

    def selected(self, action: str, rtype: str, rid: str) -> object:
        return self._build(self.ids)
