"""``[governance] two_person`` of config.toml: key lifecycle changes that wait for two
officers on this server (docs/access.md, "Two-person rule").

Against the application ``modelseal serve`` builds, on 127.0.0.1 in a thread of this process
(``tests.test_access_cli.gov_server``: real mutual TLS, the shipped Cedar policy, real TOTP
codes enrolled through the API) with a broker key over the test keystore's ``local:test-kek``:
a configured rotate is queued (202) and runs once two other officers approved it, each with a
fresh code; without the setting it runs at once; and a setting naming an action that cannot
wait is refused before the server serves anything.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from modelseal.errors import GovernanceError
from modelseal.governance.approvals import SettingsError, parse_settings
from modelseal.governance.model import Binding, Resource
from modelseal.keys.config import ConfigError
from modelseal.pki.identity import parse
from modelseal.server import tls
from modelseal.server.gov_decide import SOURCE, WAITS_ON
from tests.conftest import Env
from tests.test_access_cli import USER, World, world  # noqa: F401 (the fixture)

ADMIN = f"{USER}/admin1"
BROKER = '[broker.keys.llama-prod]\nkey = "local:test-kek"\nenv = "prod"\n'
KEY = Resource("Key", "llama-prod", {"env": "prod", "provider": "local"})


def call(w: World, who: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """(status, JSON body) of one request to ``/modelseal/v1/PATH`` as the user ``who``."""
    c = http.client.HTTPSConnection("127.0.0.1", w.port, context=tls.client_context(w.folder(who)), timeout=30)
    try:
        c.request(method, "/modelseal/v1/" + path, None if body is None else json.dumps(body).encode())
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def otp(w: World, who: str) -> str:
    return w.otp.code(f"{USER}/{who}")


def versions(w: World) -> list[tuple[int, str]]:
    st, body = call(w, "admin1", "GET", "keys/llama-prod")
    assert st == 200, body
    return [(v["version"], v["state"]) for v in body["versions"]]


def configured(config: str) -> Callable[[Env, pytest.FixtureRequest], World]:
    """A ``world`` fixture whose config.toml is ``BROKER`` + ``config``, with a key-admin
    (admin1) and two officers enrolled for MFA."""

    def fixture(env: Env, request: pytest.FixtureRequest) -> World:
        (env.home / "config.toml").write_text(BROKER + config)
        os.chmod(env.home / "config.toml", 0o600)
        w: World = request.getfixturevalue("world")
        w.gov.store.bind(Binding("", ADMIN, "key-admin", "prod", time.time() + 3600), by="test")
        for who in ("admin1", "officer1", "officer2"):
            w.enrol(who)
        return w

    return fixture


two_person = pytest.fixture(configured('[governance]\ntwo_person = ["key.rotate", "key.disable"]\n'))
plain = pytest.fixture(configured(""))


def test_a_configured_rotate_waits_for_two_officers_and_then_runs(two_person: World) -> None:
    w = two_person
    assert w.gov.authz.two_person == {"key.rotate", "key.disable"}  # handed to the decider at start
    assert versions(w) == [(1, "active")]
    st, body = call(w, "admin1", "POST", "keys/llama-prod/rotate", {})
    assert st == 403 and "step-up MFA" in body["errors"][0]["message"]  # no code: refused, not queued
    st, queued = call(w, "admin1", "POST", "keys/llama-prod/rotate", {"otp": otp(w, "admin1")})
    assert st == 202 and queued["action"] == "key.rotate" and queued["needs"] == 2, queued
    assert queued["waits_on"] == ["gov-two-person-configured"]  # the Cedar id that made it wait
    aid = queued["approval"]
    assert versions(w) == [(1, "active")]  # nothing ran yet
    # Cedar itself forbids the rotate unapproved: no other path runs it meanwhile.
    d = w.gov.authz.decide(parse(ADMIN), "key.rotate", KEY, {"mfa": True})
    assert not d.allowed and d.policies == ("gov-two-person-configured",)
    assert w.gov.authz.decide(parse(ADMIN), "key.rotate", KEY, {"mfa": True, "approved": True}).allowed
    st, listed = call(w, "officer1", "GET", "approvals")
    (a,) = [x for x in listed["approvals"] if x["id"] == aid]
    want = {"name": "llama-prod", "version": None, SOURCE: "127.0.0.1", WAITS_ON: ["gov-two-person-configured"]}
    assert a["params"] == want and a["requester"] == ADMIN  # what will run, and why it waits
    # The requester cannot approve it, even with a good code.
    st, body = call(w, "admin1", "POST", f"approvals/{aid}/approve", {"otp": otp(w, "admin1")})
    assert st == 403 and versions(w) == [(1, "active")]  # a key-admin decides no approvals
    st, first = call(w, "officer1", "POST", f"approvals/{aid}/approve", {"otp": otp(w, "officer1")})
    assert st == 200 and first["state"] == "pending" and first["approvals"] == [f"{USER}/officer1"]
    assert versions(w) == [(1, "active")]
    st, body = call(w, "officer2", "POST", f"approvals/{aid}/approve", {"otp": "000000"})
    assert st == 403 and "wrong OTP code" in body["errors"][0]["message"]
    st, done = call(w, "officer2", "POST", f"approvals/{aid}/approve", {"otp": otp(w, "officer2")})
    assert st == 200 and done["state"] == "done", done
    assert done["result"] == {
        "key": "llama-prod",
        "op": "rotate",
        "version": 2,
        "states": {"1": "active", "2": "active"},
    }
    assert versions(w) == [(1, "active"), (2, "active")]  # the rotation ran, once
    rotations = [e for e in w.env.sink.events if e.operation == "rotate"]
    assert len(rotations) == 1 and rotations[0].actor == ADMIN  # the requester's change
    runs = [e for e in w.env.sink.events if e.operation == "approval-run"]
    assert [(e.actor, e.result) for e in runs] == [(ADMIN, f"done:{aid}")]


def test_a_configured_disable_is_checked_when_asked_and_its_failure_names_no_backing_key(two_person: World) -> None:
    w = two_person
    st, body = call(w, "admin1", "POST", "keys/llama-prod/disable", {"otp": otp(w, "admin1")})
    assert st == 400 and "disable takes the version" in body["errors"][0]["message"]
    st, queued = call(w, "admin1", "POST", "keys/llama-prod/disable", {"version": 9, "otp": otp(w, "admin1")})
    assert st == 202, queued
    for o in ("officer1", "officer2"):
        st, done = call(w, o, "POST", f"approvals/{queued['approval']}/approve", {"otp": otp(w, o)})
    assert st == 200 and done["state"] == "failed" and done["error"], done
    assert "test-kek" not in done["error"] and "llama-prod" in done["error"]  # the broker name, never the backing one
    assert versions(w) == [(1, "active")]
    st, body = call(w, "admin1", "POST", "keys/llama-prod/enable", {"version": 1, "otp": otp(w, "admin1")})
    assert st == 200 and body["versions"][0]["state"] == "active"  # not configured: runs at once


def test_without_the_setting_a_rotate_runs_at_once(plain: World) -> None:
    w = plain
    assert w.gov.authz.two_person == frozenset()
    st, body = call(w, "admin1", "POST", "keys/llama-prod/rotate", {"otp": otp(w, "admin1")})
    assert st == 200 and [v["version"] for v in body["versions"]] == [1, 2], body
    st, listed = call(w, "officer1", "GET", "approvals")
    assert st == 200 and listed["approvals"] == []
    d = w.gov.authz.decide(parse(ADMIN), "key.rotate", KEY, {"mfa": True, "two_person": True})
    assert d.allowed  # the decider's own fact, never a handler's


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (["key.frobnicate"], "'key.frobnicate' is an unknown action"),
        (["pull"], "'pull' is an action that cannot wait for approval"),
        (["key.create"], "cannot wait for approval"),
        ("key.rotate", "must be a list of actions"),
        ([1], "must be a list of actions"),
    ],
)
def test_a_two_person_setting_naming_what_cannot_wait_is_refused(value: object, why: str) -> None:
    with pytest.raises(SettingsError, match=why) as e:
        parse_settings({"two_person": value})
    assert isinstance(e.value, ConfigError) and isinstance(e.value, GovernanceError)


def test_the_two_person_setting_keeps_each_configurable_action_once() -> None:
    s = parse_settings({"two_person": ["key.enable", "key.destroy", "key.rotate", "key.enable"]})
    assert s.two_person == ("key.enable", "key.rotate")  # key.destroy waits always
    assert parse_settings({}).two_person == ()


def test_a_server_with_a_bad_two_person_setting_does_not_start(env: Env) -> None:
    from modelseal.governance.store import open_target
    from modelseal.server import app as app_mod
    from modelseal.server.identity import Authorizer
    from tests.push_pull_helpers import TD

    (env.home / "config.toml").write_text('[governance]\ntwo_person = ["key.rotat"]\n')
    os.chmod(env.home / "config.toml", 0o600)
    auth = Authorizer.for_server(TD, "prod")
    gov = app_mod.open_governance(open_target(env.work / "data", None), auth, env.sink, env.svc)
    try:
        with pytest.raises(ConfigError, match=r"'key\.rotat' is an unknown action"):
            app_mod.make_app(auth, governance=gov)
    finally:
        gov.close()
