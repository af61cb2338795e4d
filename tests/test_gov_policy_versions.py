"""Policy change management: versions kept by digest, the active one pinned and re-hashed
on every load (SQLite and a real PostgreSQL), and the HTTP flow: a proposal takes effect
only once two other officers approved its activation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from modelseal.errors import GovernanceError
from modelseal.governance.cedar import default_policy
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore
from modelseal.governance.versions import DEFAULT, PolicyStore, digest_of
from modelseal.pki.identity import parse
from modelseal.server import authz, gov_api, policy_api
from modelseal.server.identity import IDENTITY

from .conftest import Env

EXTRA = '\n@id("repo-team7") permit(principal, action == Action::"pull", resource == Repository::"team7/m");\n'
NEW = default_policy().text + EXTRA


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "governance.db")
        return
    from .services import postgres

    with postgres() as url:
        yield url


@pytest.fixture
def store(target: str) -> Iterator[PolicyStore]:
    s = PolicyStore.open(target)
    yield s
    s.close()


def test_a_proposal_is_kept_and_takes_no_effect(store: PolicyStore) -> None:
    v = store.propose(NEW, "spiffe://d/prod/user/alice", "team7 may pull", now=100.0)
    assert v.digest == digest_of(NEW) and not v.active
    assert store.active() is default_policy() and store.active_digest() == DEFAULT
    again = store.propose(NEW, "spiffe://d/prod/user/bob", "again")
    assert (again.proposer, again.note, again.proposed) == ("spiffe://d/prod/user/alice", "team7 may pull", 100.0)
    assert [x.digest for x in store.versions()] == [v.digest]
    assert store.get(v.digest).text == NEW


def test_an_invalid_policy_is_never_stored(store: PolicyStore) -> None:
    with pytest.raises(GovernanceError, match="no @id"):
        store.propose("permit(principal, action, resource);", "spiffe://d/prod/user/alice")
    assert store.versions() == []


def test_activation_pins_the_digest_and_keeps_history(store: PolicyStore) -> None:
    first = store.propose(NEW, "spiffe://d/prod/user/alice")
    second = store.propose(default_policy().text, "spiffe://d/prod/user/alice")
    a = store.activate(first.digest, "spiffe://d/prod/user/alice", ["o2", "o1"], now=200.0)
    assert (a.seq, a.approvals) == (1, ("o1", "o2"))
    assert store.active().digest == first.digest and "repo-team7" in store.active().ids
    store.activate(second.digest, "spiffe://d/prod/user/carol", ["o3", "o4"])
    assert store.active().digest == second.digest
    assert [x.digest for x in store.activations()] == [first.digest, second.digest]
    flags = {x.digest: x.active for x in store.versions()}
    assert flags == {first.digest: False, second.digest: True}


def test_a_tampered_stored_version_is_refused_never_replaced(store: PolicyStore) -> None:
    v = store.propose(NEW, "spiffe://d/prod/user/alice")
    store.activate(v.digest, "spiffe://d/prod/user/alice", ["o1", "o2"])
    assert "repo-team7" in store.active().ids
    evil = NEW.replace('resource == Repository::"team7/m"', "resource")  # team7's permit widened to everything
    store.run(lambda q: q("UPDATE gov_policy_versions SET body = ? WHERE digest = ?", evil, v.digest))
    with pytest.raises(GovernanceError, match=r"fails its pinned digest \(tampered\)"):
        store.active()
    with pytest.raises(GovernanceError, match="tampered"):
        store.get(v.digest)
    with pytest.raises(GovernanceError, match="tampered"):
        store.activate(v.digest, "spiffe://d/prod/user/alice", ["o1", "o2"])
    store.run(lambda q: q("DELETE FROM gov_policy_versions WHERE digest = ?", v.digest))
    with pytest.raises(GovernanceError, match="tampered"):  # the pinned version is gone: no fallback
        store.active()


def test_unknown_and_malformed_digests_are_refused(store: PolicyStore) -> None:
    with pytest.raises(GovernanceError, match="no policy version"):
        store.activate("sha256:" + "1" * 64, "spiffe://d/prod/user/alice", [])
    with pytest.raises(GovernanceError, match="sha256:<64 hex"):
        store.get("sha256:../../etc")


# -- the HTTP flow (in process; the mTLS identity middleware is stood in for) -----------------

OFFICERS = [f"spiffe://example.org/prod/user/officer{i}" for i in range(4)]
AUDITOR = "spiffe://example.org/prod/user/auditor"


@web.middleware
async def as_caller(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """What server.identity does from the verified client certificate, from a test header."""
    request[IDENTITY] = parse(request.headers["X-Test-Identity"])
    return await handler(request)


class Flow:
    def __init__(self, client: TestClient[Any, Any], app: web.Application) -> None:
        self.client, self.app, self.secrets = client, app, {}
        self.t0 = time.time()

    async def call(self, who: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = await self.client.request(method, path, json=body, headers={"X-Test-Identity": who})
        return resp.status, await resp.json()

    def code(self, who: str, steps: int) -> str:
        return pyotp.TOTP(self.secrets[who]).at(self.t0 + 30 * steps)

    async def enroll(self, who: str) -> None:
        status, doc = await self.call(who, "POST", "/modelseal/v1/mfa/enroll")
        assert status == 200, doc
        self.secrets[who] = pyotp.parse_uri(doc["uri"]).secret
        status, doc = await self.call(who, "POST", "/modelseal/v1/mfa/confirm", {"otp": self.code(who, 0)})
        assert status == 200, doc


def run_flow(env: Env, tmp_path: Path, body: Callable[[Flow, PolicyStore], Awaitable[None]]) -> None:
    target = str(tmp_path / "gov" / "governance.db")
    gov, policies = GovStore.open(target), PolicyStore.open(target)
    for who in OFFICERS:
        gov.bind(Binding("", who, "security-officer", "prod", time.time() + 3600), "test")
    gov.bind(Binding("", AUDITOR, "auditor", "prod", time.time() + 3600), "test")

    async def main() -> None:
        app = web.Application(middlewares=[as_caller])
        authz.install(app, authz.Authz(gov, policies, "prod", "example.org", env.sink))
        gov_api.add_routes(app, gov, env.svc)
        policy_api.add_routes(app, policies)
        async with TestClient(TestServer(app)) as client:
            flow = Flow(client, app)
            for who in OFFICERS:
                await flow.enroll(who)
            await body(flow, policies)

    try:
        asyncio.run(main())
    finally:
        gov.close()
        policies.close()


def test_a_proposal_takes_effect_only_once_approved(env: Env, tmp_path: Path) -> None:
    async def body(f: Flow, policies: PolicyStore) -> None:
        o0, o1, o2, o3 = OFFICERS
        status, doc = await f.call(o0, "POST", "/modelseal/v1/policy/versions", {"text": NEW, "note": "team7"})
        assert status == 403 and "step-up MFA" in doc["errors"][0]["message"]  # no code: no proposal
        body = {"text": NEW, "note": "team7", "otp": f.code(o0, 1)}
        status, doc = await f.call(o0, "POST", "/modelseal/v1/policy/versions", body)
        assert status == 201 and doc["digest"] == digest_of(NEW), doc
        digest = doc["digest"]
        status, doc = await f.call(AUDITOR, "GET", "/modelseal/v1/policy")
        assert status == 200 and doc["digest"] == default_policy().digest and doc["source"] == DEFAULT
        activation = {"digest": digest, "otp": f.code(o1, 1)}
        status, doc = await f.call(o1, "POST", "/modelseal/v1/policy/activate", activation)
        assert status == 202 and doc["needs"] == 2, doc
        aid = doc["approval"]
        assert policies.active_digest() == DEFAULT  # asked for, not approved: nothing changed
        status, doc = await f.call(o1, "POST", f"/modelseal/v1/approvals/{aid}/approve", {"otp": f.code(o1, 1)})
        assert status in (403, 409) and policies.active_digest() == DEFAULT  # never one's own request
        status, doc = await f.call(o2, "POST", f"/modelseal/v1/approvals/{aid}/approve", {"otp": f.code(o2, 1)})
        assert status == 200 and policies.active_digest() == DEFAULT, doc  # one of two
        status, doc = await f.call(o3, "POST", f"/modelseal/v1/approvals/{aid}/approve", {"otp": f.code(o3, 1)})
        assert status == 200, doc
        assert policies.active_digest() == digest and "repo-team7" in policies.active().ids
        last = policies.activations()[-1]
        assert (last.requested_by, last.approvals) == (o1, tuple(sorted([o2, o3])))
        status, doc = await f.call(AUDITOR, "GET", "/modelseal/v1/policy/versions")
        assert status == 200 and doc["active"] == digest and [v["active"] for v in doc["versions"]] == [True]

    run_flow(env, tmp_path, body)


def test_a_denied_activation_never_takes_effect(env: Env, tmp_path: Path) -> None:
    async def body(f: Flow, policies: PolicyStore) -> None:
        o0, o1, o2, _ = OFFICERS
        v = policies.propose(NEW, o0)
        status, doc = await f.call(
            o0, "POST", "/modelseal/v1/policy/activate", {"digest": v.digest, "otp": f.code(o0, 1)}
        )
        assert status == 202, doc
        aid = doc["approval"]
        status, doc = await f.call(o1, "POST", f"/modelseal/v1/approvals/{aid}/deny", {"otp": f.code(o1, 1)})
        assert status == 200, doc
        status, doc = await f.call(o2, "POST", f"/modelseal/v1/approvals/{aid}/approve", {"otp": f.code(o2, 1)})
        assert status == 409 and policies.active_digest() == DEFAULT, doc

    run_flow(env, tmp_path, body)


def test_the_policy_routes_are_decided(env: Env, tmp_path: Path) -> None:
    async def body(f: Flow, policies: PolicyStore) -> None:
        status, doc = await f.call(AUDITOR, "POST", "/modelseal/v1/policy/versions", {"text": NEW, "otp": "123456"})
        assert status == 403, doc  # an auditor reads, never proposes
        status, doc = await f.call(AUDITOR, "POST", "/modelseal/v1/policy/activate", {"digest": digest_of(NEW)})
        assert status == 404, doc  # not proposed
        v = policies.propose(NEW, OFFICERS[0])
        status, doc = await f.call(AUDITOR, "POST", "/modelseal/v1/policy/activate", {"digest": v.digest})
        assert status == 403, doc
        status, doc = await f.call(AUDITOR, "GET", f"/modelseal/v1/policy/versions/{v.digest}")
        assert status == 200 and doc["text"] == NEW and "repo-team7" in doc["ids"]
        status, doc = await f.call("spiffe://example.org/prod/user/nobody", "GET", "/modelseal/v1/policy")
        assert status == 403 and "no policy permits policy.read" in doc["errors"][0]["message"]
        bad = {"text": "permit(principal, action, resource);", "otp": f.code(OFFICERS[2], 1)}
        status, doc = await f.call(OFFICERS[2], "POST", "/modelseal/v1/policy/versions", bad)
        assert status == 400 and "has no @id" in doc["errors"][0]["message"], doc
        assert [x.digest for x in policies.versions()] == [v.digest]

    run_flow(env, tmp_path, body)
