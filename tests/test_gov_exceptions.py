"""Exceptions to the encryption standards: they waive only @standard forbids, only while
unexpired, only over a request a permit allows; every use names the exception."""

from __future__ import annotations

import pytest

from modelseal.errors import GovernanceError
from modelseal.governance import standards
from modelseal.governance.cedar import Engine, PolicySet, default_policy
from modelseal.governance.exceptions import parse_expiry
from modelseal.governance.model import Binding, Principal, Request, Resource

NOW = parse_expiry("2027-01-01T00:00:00Z", "t")
LEGACY = "a" * 64  # the artifact id the exception is about


def exception(
    exc_id: str = "EXC-1",
    waives: str = "std-prod-kms",
    expires: str = "2027-01-01T00:00:10Z",
    when: str = f'resource.artifact_id == "{LEGACY}"',
    extra: str = "",
) -> str:
    return f"""
@id("{exc_id.lower()}-policy")
@exception("{exc_id}")
@waives("{waives}")
@justification("the legacy model is re-sealed under transit in Q1")
@owner("ml-platform@example.org")
@approved_by("ciso@example.org")
@expires("{expires}")
{extra}
permit (principal, action in [Action::"artifact.check", Action::"artifact.pull"], resource is Artifact)
when {{ {when} }};
"""


def policies(*excs: str) -> PolicySet:
    return PolicySet.parse(default_policy().text + "".join(excs), "with-exceptions.cedar")


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def local_prod(aid: str = LEGACY, **changes: object) -> Resource:
    attrs: dict[str, object] = {
        "env": "prod",
        "artifact_env": "prod",
        "schemes": ["local"],
        "has_local": True,
        "signatures": 0,
        "threshold": 0,
        "has_trust": False,
        "artifact_id": aid,
    }
    return Resource("Artifact", aid, {**attrs, **changes})


CALLER = Principal("spiffe://local/prod/user/modelseal", "prod", "user", "local")


def req(r: Resource, action: str = "artifact.check", who: Principal = CALLER) -> Request:
    return Request(who, action, r, {})


def test_an_exception_allows_and_the_decision_names_it() -> None:
    e = Engine(policies(exception()), now=Clock(NOW))
    d = e.decide(req(local_prod()))
    assert d.allowed and d.exception == "EXC-1"
    assert d.policies == ("std-artifact-base", "EXC-1")
    assert "exception EXC-1 waives std-prod-kms" in d.reason and "ml-platform@example.org" in d.reason
    assert "2027-01-01T00:00:10Z" in d.reason and d.expired == ()


def test_an_expired_exception_stops_at_once_and_is_reported() -> None:
    clock = Clock(NOW + 9)
    e = Engine(policies(exception()), now=clock)
    assert e.decide(req(local_prod())).allowed
    clock.t = NOW + 10  # the second it expires: no cache, no grace
    d = e.decide(req(local_prod()))
    assert not d.allowed and d.exception is None
    assert d.expired == ("EXC-1",)
    assert d.policies == ("std-prod-kms",)
    assert "exception EXC-1 expired at 2027-01-01T00:00:10Z" in d.reason
    assert "\n" not in d.reason


def test_an_exception_applies_only_to_what_it_matches() -> None:
    e = Engine(policies(exception()), now=Clock(NOW))
    d = e.decide(req(local_prod("b" * 64)))
    assert not d.allowed and d.exception is None and d.expired == ()  # not this artifact
    d = e.decide(req(local_prod(), action="artifact.push"))  # not this action
    assert not d.allowed


def test_an_exception_must_waive_every_standard_that_denied() -> None:
    e = Engine(policies(exception()), now=Clock(NOW))
    r = local_prod(has_trust=True, threshold=2)  # also short of signatures
    d = e.decide(req(r))
    assert not d.allowed and set(d.policies) == {"std-prod-kms", "std-signatures"}
    both = Engine(policies(exception(waives="std-prod-kms, std-signatures")), now=Clock(NOW))
    d = both.decide(req(r))
    assert d.allowed and d.exception == "EXC-1"


def test_an_exception_never_lifts_a_non_standard_forbid() -> None:
    e = Engine(policies(exception()), now=Clock(NOW))
    dev_caller = Principal("spiffe://local/dev/user/modelseal", "dev", "user", "local")
    d = e.decide(req(local_prod(), who=dev_caller))
    assert not d.allowed and "gov-env-boundary" in d.policies and d.exception is None


def test_an_exception_grants_nothing_the_main_set_does_not_permit() -> None:
    broad = exception(exc_id="EXC-ALL", when="true").replace(
        'action in [Action::"artifact.check", Action::"artifact.pull"], resource is Artifact', "action, resource"
    )
    e = Engine(policies(broad), now=Clock(NOW))
    reader = Principal(
        "spiffe://d/prod/user/r",
        "prod",
        "user",
        "d",
        (Binding("b", "spiffe://d/prod/user/r", "reader", "prod", NOW + 60),),
    )
    d = e.decide(Request(reader, "key.rotate", Resource("Key", "k", {"env": "prod"}), {"mfa": True}))
    assert not d.allowed and d.exception is None  # kept out of the main set
    assert e.decide(req(local_prod())).exception == "EXC-ALL"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (exception(waives="gov-sod"), "not a @standard forbid"),
        (exception(waives="gov-step-up-mfa"), "only encryption standards can be waived"),
        (exception(waives="std-nope"), "not a @standard forbid"),
        (exception().replace('@owner("ml-platform@example.org")', ""), "missing @owner"),
        (exception().replace('@justification("the legacy model is re-sealed under transit in Q1")', ""), "missing"),
        (exception().replace('@approved_by("ciso@example.org")', ""), "missing @approved_by"),
        (exception(expires="2027-01-01T01:00:00+01:00"), "UTC"),
        (exception(expires="next week"), "RFC 3339"),
        (exception().replace("permit (", "forbid ("), "must be a permit"),
        (exception() + exception(extra="").replace("exc-1-policy", "other"), "used twice"),
    ],
)
def test_bad_exceptions_are_refused_when_parsed(text: str, message: str) -> None:
    with pytest.raises(GovernanceError, match=message):
        policies(text)


def test_the_check_report_says_waived_and_expired() -> None:
    facts = standards.ArtifactFacts("prod", "prod", ("local:k#1",), frozenset({"local"}), artifact_id=LEGACY)
    live = standards.check(facts, Engine(policies(exception()), now=Clock(NOW)))
    assert live.ok
    kms = next(f for f in live.findings if f.standard == "std-prod-kms")
    assert kms.status == "waived" and "EXC-1" in kms.reason
    late = standards.check(facts, Engine(policies(exception()), now=Clock(NOW + 11)))
    assert not late.ok
    statuses = {f.standard: f.status for f in late.findings}
    assert statuses["std-prod-kms"] == "violation" and statuses["EXC-1"] == "expired"
