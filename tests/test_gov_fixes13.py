"""The fixes of the issue 13 red-team review: no self-grants and a two-person officer pool
(finding 1, end to end through ``test_access_cli``'s world), the standards decided at pull
(2, a real ``modelseal serve``), approvals decided in the request's environment (3), last
use stamped only on the bindings that allowed (4), break-glass as a data role at bind time
(5), the MFA lockout re-checked inside the recording transaction (6), and broker recipients
that never drive a provider lookup (7)."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import GovernanceError, PolicyDenied
from modelseal.format.header import Recipient, normalize_context
from modelseal.governance import brokerops as ops
from modelseal.governance.approvals import Approvals
from modelseal.governance.brokerkeys import BrokerKey
from modelseal.governance.cedar import default_policy
from modelseal.governance.mfa import Mfa, request_digest
from modelseal.governance.model import Binding, Resource
from modelseal.governance.store import GovStore, open_target
from modelseal.governance.versions import PolicyStore
from modelseal.pki.identity import Identity
from modelseal.server import authz
from tests.conftest import Env
from tests.oci_helpers import SEALED_LAYER, image, running_server
from tests.push_pull_helpers import LOCAL_KEYS_EXCEPTION
from tests.test_access_cli import TD, TRAINER, USER, World, world  # noqa: F401 (the fixture)

T0 = 1_800_000_000.0
PROD = normalize_context({"env": "prod", "model": "m1"})


@pytest.fixture
def w(world: World) -> World:  # noqa: F811 (test_access_cli's fixture: a real mTLS server and CLI)
    return world


# -- 1: nobody grants themselves access; the officer pool is two-person ------------------------


def test_nobody_grants_themselves_access(w: World) -> None:
    w.enrol("officer1")
    for argv in (
        ("access", "grant", "--role", "reader", "--to", f"{USER}/officer1", "--for", "2h", "--reason", "x"),
        ("access", "bind", f"{USER}/*", "--role", "key-admin", "--expires", "1d"),
        ("access", "bind", f"spiffe://{TD}/prod/*/officer1", "--role", "auditor", "--expires", "1d"),
    ):
        rc, out, err = w.with_otp("officer1", *argv)
        assert rc == 17 and out == "" and "nobody grants themselves access" in err, err
        assert err.count("\n") == 1
    assert {b.role for b in w.gov.store.bindings()} == {"security-officer"}
    rc, out, err = w.with_otp("officer1", "access", "bind", f"{USER}/dave", "--role", "auditor", "--expires", "1d")
    assert rc == 0 and "auditor@prod" in out, err  # someone else: as before


def aid_of(err: str) -> str:
    m = re.search(r"as request ([0-9a-f]{16}) ", err)
    assert m is not None, err
    return m.group(1)


def _approve(w: World, aid: str, *officers: str) -> str:
    out = ""
    for o in officers:
        rc, out, err = w.with_otp(o, "approve", aid)
        assert rc == 0, err
    return out


def test_the_officer_pool_changes_only_with_a_second_officer(w: World) -> None:
    for o in ("officer1", "officer2", "officer3"):
        w.enrol(o)
    new = f"{USER}/officer5"
    rc, _, err = w.with_otp("officer1", "access", "bind", new, "--role", "security-officer", "--expires", "30d")
    assert rc == 18 and "waits for approval by 2 security officers" in err, err
    assert all(b.pattern != new for b in w.gov.store.bindings())  # not yet
    _approve(w, aid_of(err), "officer2", "officer3")
    mine = [b for b in w.gov.store.bindings() if b.pattern == new]
    assert [(b.role, b.created_by) for b in mine] == [("security-officer", f"{USER}/officer1")]
    # removing an officer: queued too
    four = next(b for b in w.gov.store.bindings() if b.pattern == f"{USER}/officer4")
    rc, _, err = w.with_otp("officer1", "access", "unbind", four.id)
    assert rc == 18, err
    assert any(b.id == four.id for b in w.gov.store.bindings())
    _approve(w, aid_of(err), "officer2", "officer3")
    assert all(b.id != four.id for b in w.gov.store.bindings())
    # an officer binding names one exact user identity
    for pattern in (f"{USER}/*", TRAINER):
        rc, _, err = w.with_otp("officer1", "access", "bind", pattern, "--role", "security-officer", "--expires", "1d")
        assert rc == 16 and "one exact user identity" in err, err
    with pytest.raises(GovernanceError, match="one exact user identity"):
        w.gov.store.bind(Binding("", f"{USER}/x*", "security-officer", "prod", time.time() + 60), "tests")


# -- 3: an approval is decided in its request's environment -------------------------------------


def test_an_approval_is_decided_in_the_requests_environment(w: World) -> None:
    w.enrol("officer2")
    dev = Approvals.open(open_target(w.data, None))
    try:  # as a dev server sharing this database would have stored it
        key = Resource("Key", "dev-kek", {"env": "dev"})
        a = dev.request("key.destroy", key, {"key": "dev-kek"}, f"spiffe://{TD}/dev/user/mallory", 1)
    finally:
        dev.close()
    rc, out, _ = w.run("officer2", "approvals", "list", "--json")
    assert rc == 0 and a.id not in out  # another environment's requests are not shown
    rc, _, err = w.with_otp("officer2", "approve", a.id)
    assert rc == 17 and "approval.decide" in err and "denied" in err, err  # decided in dev: no role there


# -- 2: the standards at pull ---------------------------------------------------------------------


def test_an_expired_exception_stops_a_pull_at_once(env: Env) -> None:
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(4000))
    modelseal.seal(src, env.work / "w.sealed", key="test-kek", keys=env.svc)  # local: refused in prod
    with running_server(env) as server:
        c = server.client()
        layer, cfg = c.push_blob("team/m", (env.work / "w.sealed").read_bytes()), c.push_blob("team/m", b"{}")
        doc = image(cfg, [(SEALED_LAYER, layer, (env.work / "w.sealed").stat().st_size)])
        doc["artifactType"] = "application/vnd.modelseal.artifact.v1"
        assert c.put_manifest("team/m", "v1", doc).status == 201
        assert c.request("GET", "/v2/team/m/manifests/v1").status == 200
        until = time.time() + 6
        pull_waiver = (
            LOCAL_KEYS_EXCEPTION.replace("tests-local-keys", "pull-until-soon")
            .replace("2099-01-01T00:00:00Z", datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            .replace(
                'action in [Action::"artifact.push", Action::"artifact.pull"]', 'action == Action::"artifact.pull"'
            )
        )
        text = default_policy().text + LOCAL_KEYS_EXCEPTION.replace("artifact.pull", "artifact.seal") + pull_waiver
        policies = PolicyStore.open(open_target(server.data, None))
        try:
            policies.activate(policies.propose(text, "tests", "pull until soon").digest, "tests", ["a", "b"])
        finally:
            policies.close()
        time.sleep(authz.CACHE_SECONDS + 0.2)
        assert c.request("GET", "/v2/team/m/manifests/v1").status == 200  # the exception is live
        time.sleep(max(0.0, until - time.time()) + 1.1)
        r = c.request("GET", "/v2/team/m/manifests/v1")
        assert r.status == 403 and r.code() == "DENIED" and "std-prod-kms" in r.body.decode()
        assert c.request("HEAD", "/v2/team/m/manifests/v1").status == 200  # no content: repository pull only
        c.close()


# -- 4, 5: last use and break-glass at bind time ------------------------------------------------


def test_last_use_is_stamped_only_on_the_bindings_that_allowed(tmp_path: Path) -> None:
    store = GovStore.open(tmp_path / "gov" / "governance.db")
    reader = store.bind(Binding("", TRAINER, "reader", "prod", T0 + 86400), by="test", now=T0)
    auditor = store.bind(Binding("", TRAINER, "auditor", "prod", T0 + 86400), by="test", now=T0)
    az = authz.Authz(store, None, "prod", TD, MemorySink(), now=lambda: T0 + 10)  # type: ignore[arg-type]
    who = Identity.of(TD, "prod", "service", "trainer")
    assert az.decide(who, "pull", Resource("Repository", "m", {"env": "prod"})).allowed
    used = {b.id: b.last_used for b in store.bindings(now=T0)}
    assert used[reader.id] == T0 + 10 and used[auditor.id] is None
    store.close()


def test_break_glass_counts_as_a_data_role_when_bound(tmp_path: Path) -> None:
    store = GovStore.open(tmp_path / "gov" / "governance.db")
    admin, other = f"{USER}/keyadmin", f"{USER}/oncall"
    store.bind(Binding("", admin, "key-admin", "prod", T0 + 86400), by="test", now=T0)
    glass = Binding("", admin, "break-glass", "prod", T0 + 3600, "break-glass", "INC-1")
    with pytest.raises(GovernanceError, match="separation of duties"):
        store.check(glass, now=T0)
    store.bind(Binding("", other, "break-glass", "prod", T0 + 3600, "break-glass", "INC-2"), by=other, now=T0)
    with pytest.raises(GovernanceError, match="separation of duties"):
        store.bind(Binding("", other, "key-admin", "prod", T0 + 86400), by="test", now=T0)
    store.close()


# -- 6: the lockout inside the transaction ---------------------------------------------------------


def test_a_guess_racing_the_lockout_is_refused_inside_the_transaction(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = Mfa.open(open_target(tmp_path / "data", None), env.svc, "local:modelseal-governance")
    who = f"{USER}/alice"
    secret = parse_qs(urlsplit(m.enroll(who, now=T0)).query)["secret"][0]
    m.confirm(who, pyotp.TOTP(secret).at(int(T0)), now=T0)
    record = m._record

    def raced(q, identity, *args):  # type: ignore[no-untyped-def]
        # another guess, in flight meanwhile, was the fifth wrong one: the identity is locked now
        q("UPDATE gov_mfa SET locked_until = ? WHERE identity = ?", T0 + 400, identity)
        return record(q, identity, *args)

    monkeypatch.setattr(m, "_record", raced)
    digest = request_digest("key.rotate", "k", {"key": "k"})
    with pytest.raises(GovernanceError, match="MFA is locked"):
        m.verify(who, pyotp.TOTP(secret).at(int(T0 + 30)), digest, now=T0 + 30)
    m.close()


# -- 7: broker recipients never drive a provider lookup --------------------------------------------


def test_an_inner_key_id_is_compared_exactly_before_any_resolution(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.svc.create("broker-prod-kek")
    entry = BrokerKey("llama", "prod", "local:broker-prod-kek", TRAINER, 1.0)
    dek = os.urandom(32)
    own = ops.wrap_one(env.svc, entry, dek, PROD, TRAINER)
    asked: list[str] = []
    resolve = env.svc.recipient_identity

    def spy(r: Recipient) -> str:
        asked.append(r.key_id)
        return resolve(r)

    monkeypatch.setattr(env.svc, "recipient_identity", spy)
    items = [(1, ops.encode_inner(Recipient("local", f"x{i}", 1, b"y" * 40)), PROD) for i in range(50)]
    got = ops.unwrap_items(env.svc, entry, [(own.key_version, own.wrapped, PROD), *items], TRAINER)
    assert got[0] == dek
    assert all(isinstance(g, PolicyDenied) and "does not belong to broker key llama" in str(g) for g in got[1:])
    assert asked == ["broker-prod-kek"]  # the server's own spelling only, once
