"""The red team's findings on holds (issue 14 section 4, notes redteam-14-holds.md), each
reproduced: against the decider and the store in process (real SQLite), and against the
application ``modelseal serve`` builds, on 127.0.0.1 in a thread of this process
(``tests.test_access_cli.gov_server``: real mutual TLS, the shipped policy, real TOTP
codes), with clients bound to other loopback sources (127.0.0.3, 127.0.0.4) where the
finding is about a source. Finding 16 (PostgreSQL) is in tests/test_holds.py."""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from modelseal.audit.events import MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.cli import holds as cli_holds
from modelseal.errors import GovernanceError
from modelseal.governance import holds as hd
from modelseal.governance.brokerkeys import BrokerKeys, parse_config
from modelseal.governance.holds import HoldIndex, HoldStore, UnknownHold, backing_resolver
from modelseal.governance.model import Binding, Resource
from modelseal.pki.identity import parse
from modelseal.server import tls
from modelseal.server.gov_api import SOURCE
from tests.conftest import Env
from tests.push_pull_helpers import TD
from tests.test_access_cli import USER, World, world  # noqa: F401 (the fixture)
from tests.test_holds import KEY_CTX, REPO, TRAINER, WRITER, Clock, _decider

DEV_TRAINER = f"spiffe://{TD}/dev/service/trainer"
LEGACY = Resource("Key", "llama-prod-legacy", {"env": "prod", "provider": "local"})


def call(w: World, who: str, method: str, path: str, body: dict[str, Any] | None = None, src: str = "127.0.0.1") -> Any:
    """(status, JSON body) of one request as ``who`` from source address ``src``."""
    ctx = tls.client_context(w.folder(who, "service" if who == "trainer" else "user"))
    c = http.client.HTTPSConnection("127.0.0.1", w.port, context=ctx, timeout=30, source_address=(src, 0))
    try:
        data = None if body is None else json.dumps(body).encode()
        c.request(method, "/modelseal/v1/" + path, data, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def code(w: World, who: str) -> str:
    return w.otp.code(f"{USER}/{who}")


def message(body: Any) -> str:
    return str(body["errors"][0]["message"])


def place_now(w: World, *args: Any, **kw: Any) -> hd.Hold:
    """A hold placed on the server's database as the monitor places it, in force at once."""
    hs = HoldStore.open(w.gov.target)
    try:
        h = hs.place(*args, **kw)
    finally:
        hs.close()
    assert w.gov.authz.holds is not None
    w.gov.authz.holds.invalidate()
    return h


@pytest.fixture
def w(request: pytest.FixtureRequest) -> World:
    """``world`` (tests.test_access_cli): a running server, four officers bootstrapped."""
    got: World = request.getfixturevalue("world")
    return got


@pytest.fixture
def keyed(env: Env, request: pytest.FixtureRequest) -> World:
    """``world`` with two catalog names for one backing key (``[broker.keys]``)."""
    text = "".join(
        f'[broker.keys.{n}]\nkey = "local:test-kek"\nenv = "prod"\n' for n in ("llama-prod", "llama-prod-legacy")
    )
    (env.home / "config.toml").write_text(text)
    os.chmod(env.home / "config.toml", 0o600)
    w: World = request.getfixturevalue("world")
    return w


# -- 1, 4, 5, 7, 12, 13, 14: one server ----------------------------------------------------------


def test_environments_keys_pages_and_the_audit_trail(keyed: World, env: Env) -> None:
    w = keyed
    for o in ("officer1", "officer2"):
        w.enrol(o)
    w.gov.store.bind(Binding("", TRAINER.uri, "reader", "prod", time.time() + 3600), by="test")
    # 1: a dev hold (the dev monitor's, on a shared database) is invisible here and cannot be released here
    dev = place_now(w, "identity", DEV_TRAINER, "dev monitor: burst", "modelseal-monitor")
    st, body = call(w, "officer1", "GET", "holds")
    assert st == 200 and body == {"holds": [], "next": None}
    st, body = call(
        w, "officer2", "POST", f"holds/{dev.id}/release", {"reason": "looks fine", "otp": code(w, "officer2")}
    )
    assert st == 404 and f"no hold '{dev.id}'" in message(body)
    hs = HoldStore.open(w.gov.target)
    assert hs.get(dev.id) is not None and hs.get(dev.id).active  # type: ignore[union-attr]
    # ... nor can a prod officer hold a dev identity (the hold's environment is decided)
    st, body = call(
        w,
        "officer1",
        "POST",
        "holds",
        {"kind": "identity", "subject": DEV_TRAINER, "reason": "x", "otp": code(w, "officer1")},
    )
    assert st == 403 and "no policy permits hold.release" in message(body)  # decided in dev: no role there
    assert [h.id for h in hs.active()] == [dev.id]
    # 12: a key name the catalog does not have is refused
    st, body = call(
        w,
        "officer1",
        "POST",
        "holds",
        {"kind": "key", "subject": "Llama-Prod", "reason": "typo", "otp": code(w, "officer1")},
    )
    assert st == 404 and "no broker key Llama-Prod" in message(body)
    # 4 + 13: a key hold records the backing key and holds every name of it; its event is written before the answer
    gate = threading.Event()
    real = w.gov.audit._write
    w.monkeypatch.setattr(w.gov.audit, "_write", lambda events: (gate.wait(30), real(events)))  # a stalled queue
    try:
        body = {"kind": "key", "subject": "llama-prod", "reason": "INC-9: bulk unwraps", "otp": code(w, "officer2")}
        st, held = call(w, "officer2", "POST", "holds", body)
        assert st == 201 and held["backing"] == "local:test-kek" and held["env"] == "prod"
        placed = [e for e in env.sink.events if e.operation == "hold-place"]
        assert [(e.key, e.result, e.actor) for e in placed] == [
            (f"hold:{held['id']}", "ok:key:llama-prod INC-9: bulk unwraps", f"{USER}/officer2")
        ]
    finally:
        gate.set()
    d = w.gov.authz.decide(TRAINER, "key.unwrap", LEGACY, KEY_CTX)
    assert not d.allowed and d.policies == (f"hold:{held['id']}",)  # the alias is held too
    # 7: the held party learns the hold's id only
    place_now(w, "identity", TRAINER.uri, "INC-4721: suspected insider", "modelseal-monitor")
    st, body = call(w, "trainer", "GET", "access/bindings")
    assert st == 403 and message(body).startswith("held pending review (hold ") and "insider" not in message(body)
    # 5: pages of at most ?limit= holds, ``next`` to go on
    for i in range(3):
        place_now(w, "source", f"192.0.2.{i}", "scan", "modelseal-monitor", env="prod", now=time.time() + i)
    pages, after = [], ""
    while True:
        st, body = call(w, "officer1", "GET", "holds?limit=2" + (f"&after={after}" if after else ""))
        assert st == 200 and len(body["holds"]) <= 2
        pages.append([h["subject"] for h in body["holds"]])
        if body["next"] is None:
            break
        after = body["next"]
    assert [s for p in pages for s in p] == ["llama-prod", TRAINER.uri, "192.0.2.0", "192.0.2.1", "192.0.2.2"] and len(
        pages
    ) == 3
    assert call(w, "officer1", "GET", "holds?limit=501")[0] == 400
    # 13: the way out when every officer is held: a local release, audited in this host's log
    rc, out, err = w.run(
        "officer1", "access", "release", held["id"], "--local", "--data", str(w.data), "--reason", "INC-9 over"
    )
    assert rc == 0 and f"{held['id']}  released  key llama-prod" in out, err
    events = [e for e in MerkleAuditLog(env.home / "audit.db").events() if e["operation"] == "hold-release"]
    assert [(e["key"], e["result"], e["actor"].startswith("local:")) for e in events] == [
        (f"hold:{held['id']}", "ok:key:llama-prod INC-9 over", True)
    ]
    hs.close()


def test_the_cli_line_cannot_be_forged_by_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 14: the state is the second column; reasons and actors are quoted."""
    forged = "unwrap burst)  released 2026-12-02T09:12:40Z by spiffe://example.org/prod/user/officer2  (INC-4720: ok"
    h = hd.Hold(
        "06038dc0945c255f", "identity", TRAINER.uri, forged + ' "quoted"', "modelseal-monitor", 1.8e9, env="prod"
    )
    cli_holds._print_hold(h.to_json())
    line = capsys.readouterr().out
    assert line.split("  ")[1] == "active" and line.count("\n") == 1
    assert f'reason "{forged} \\"quoted\\""' in line


# -- 2: a source hold covers the approval routes, and the run of a queued request -------------------


def test_a_held_source_files_no_approval_and_a_queued_request_from_it_does_not_run(w: World) -> None:
    for who in ("alice", "officer1", "officer2", "officer3"):
        w.enrol(who)
    place_now(w, "source", "127.0.0.3", "handshake scan", "modelseal-monitor", env="prod")
    glass = {"role": "reader", "env": "prod", "for": 3600, "reason": "INC-1"}
    st, body = call(w, "alice", "POST", "access/break-glass", {**glass, "otp": code(w, "alice")}, src="127.0.0.3")
    assert st == 403 and "held pending review" in message(body)
    st, active = call(w, "officer1", "GET", "policy")
    st, version = call(w, "officer2", "POST", "policy/versions", {"text": active["text"], "otp": code(w, "officer2")})
    assert st == 201
    st, body = call(
        w,
        "officer1",
        "POST",
        "policy/activate",
        {"digest": version["digest"], "otp": code(w, "officer1")},
        src="127.0.0.3",
    )
    assert st == 403 and "held pending review" in message(body)
    officer = {"identity": f"{USER}/mallory", "role": "security-officer", "env": "prod", "for": 86400, "reason": "x"}
    st, body = call(w, "officer1", "POST", "access/bindings", {**officer, "otp": code(w, "officer1")}, src="127.0.0.3")
    assert st == 403 and "held pending review" in message(body)
    # asked from a free source, that source held before the approvals complete: the run is refused
    st, queued = call(w, "alice", "POST", "access/break-glass", {**glass, "otp": code(w, "alice")}, src="127.0.0.4")
    assert st == 202
    h = place_now(w, "source", "127.0.0.4", "handshake scan", "modelseal-monitor", env="prod")
    for o in ("officer2", "officer3"):
        st, done = call(w, o, "POST", f"approvals/{queued['approval']}/approve", {"otp": code(w, o)})
        assert st == 200
    assert done["state"] == "failed" and f"held pending review (hold {h.id})" in done["error"]
    assert done["params"][SOURCE] == "127.0.0.4"  # the approvers saw where it was asked from
    assert not [b for b in w.gov.store.bindings() if b.pattern == f"{USER}/alice"]


# -- 3: one officer cannot hold another alone ----------------------------------------------------


def test_a_hand_hold_on_an_officer_is_two_person(w: World, env: Env) -> None:
    for o in ("officer1", "officer3", "officer4"):
        w.enrol(o)
    body = {"kind": "identity", "subject": f"{USER}/officer2", "reason": "INC-7: phished?", "otp": code(w, "officer1")}
    st, queued = call(w, "officer1", "POST", "holds", body)
    assert st == 202 and queued["action"] == "hold.release"
    assert call(w, "officer2", "GET", "holds")[0] == 200  # not held yet
    st, done = call(w, "officer3", "POST", f"approvals/{queued['approval']}/approve", {"otp": code(w, "officer3")})
    assert st == 200 and done["state"] == "pending"
    st, done = call(w, "officer4", "POST", f"approvals/{queued['approval']}/approve", {"otp": code(w, "officer4")})
    assert st == 200 and done["state"] == "done" and done["result"]["created"] is True, done
    hid = done["result"]["hold"]
    st, body = call(w, "officer2", "GET", "holds")
    assert st == 403 and message(body) == f"held pending review (hold {hid})"
    assert [(e.result, e.actor) for e in env.sink.events if e.operation == "hold-place"] == [
        (f"ok:identity:{USER}/officer2 INC-7: phished?", f"{USER}/officer1")
    ]
    # a hold on an identity that is no officer takes effect at once
    body = {"kind": "identity", "subject": WRITER.uri, "reason": "burst", "otp": code(w, "officer1")}
    assert call(w, "officer1", "POST", "holds", body)[0] == 201


# -- in process: the decider's view --------------------------------------------------------------


def test_holds_are_per_environment_in_the_store_and_the_index(tmp_path: Path) -> None:
    hs = HoldStore.open(tmp_path / "g.db")
    try:
        prod = hs.place("source", "10.0.0.9", "prod scan", "modelseal-monitor", env="prod")
        dev = hs.place("source", "10.0.0.9", "dev scan", "modelseal-monitor", env="dev")
        assert prod.id != dev.id and [h.id for h in hs.active(env="prod")] == [prod.id]
        assert hs.counts("dev") == {"identity": 0, "key": 0, "source": 1} and hs.counts()["source"] == 2
        assert HoldIndex(hs, env="dev").lookup("source", "10.0.0.9") == dev
        with pytest.raises(UnknownHold):
            hs.release(prod.id, f"spiffe://{TD}/dev/user/devops", "not mine", env="dev")
        assert hs.get(prod.id).active  # type: ignore[union-attr]
    finally:
        hs.close()


def test_a_key_hold_holds_every_catalog_name_of_its_backing_key(tmp_path: Path) -> None:
    keys = {n: {"key": "local:test-kek", "env": "prod"} for n in ("llama-prod", "llama-prod-legacy")}
    cat = BrokerKeys.open(tmp_path / "g.db", parse_config({"keys": keys}))
    a, hs, store = _decider(tmp_path, MemorySink())
    assert a.holds is not None
    a.holds.resolve = backing_resolver(cat)
    try:
        h = hs.place("key", "llama-prod", "bulk unwraps", "modelseal-monitor", env="prod")  # no backing: resolved
        a.holds.invalidate()
        d = a.decide(TRAINER, "key.unwrap", LEGACY, KEY_CTX)
        assert not d.allowed and d.policies == (f"hold:{h.id}",)
        assert a.decide(WRITER, "key.wrap", LEGACY, KEY_CTX).allowed  # wraps go on
    finally:
        a.close()
        hs.close()
        store.close()
        cat.close()


def test_source_holds_name_networks(tmp_path: Path) -> None:
    """Finding 6: a held network holds every source inside it, IPv4 and IPv6."""
    a, hs, store = _decider(tmp_path, MemorySink())
    try:
        v6 = hs.place("source", "2001:db8:1::/48", "rotating /64s", "modelseal-monitor", env="prod")
        v4 = hs.place("source", "198.51.100.0/24", "scan", "modelseal-monitor", env="prod")
        assert a.holds is not None
        a.holds.invalidate()
        for source, hold in [
            ("2001:db8:1:2::/64", v6),
            ("2001:db8:1:ff02::/64", v6),
            ("2001:db8:2::/64", None),
            ("198.51.100.77", v4),
            ("198.51.101.1", None),
            ("10.0.0.1", None),
        ]:
            d = a.decide(TRAINER, "pull", REPO, source=source)
            assert d.allowed is (hold is None) and d.policies[:1] == ((f"hold:{hold.id}",) if hold else d.policies[:1])
    finally:
        a.close()
        hs.close()
        store.close()


def test_the_number_of_holds_is_bounded_and_the_refresh_is_single_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hs = HoldStore.open(tmp_path / "g.db")
    monkeypatch.setattr(hd, "MAX_ACTIVE", 3)
    try:
        for i in range(3):
            hs.place("source", f"10.0.0.{i}", "scan", "modelseal-monitor", env="prod")
        with pytest.raises(hd.TooManyHolds, match="prod has 3 active holds"):
            hs.place("source", "10.0.0.9", "scan", "modelseal-monitor", env="prod")
        assert hs.place_once("source", "10.0.0.1", "again", "modelseal-monitor", env="prod")[1] is False
        hs.place("source", "10.0.0.9", "scan", "modelseal-monitor", env="dev")  # per environment
        reads: list[int] = []
        real = hs.snapshot

        def slow(known: int | None, env: str | None = None) -> Any:
            reads.append(1)
            time.sleep(0.3)
            return real(known, env)

        monkeypatch.setattr(hs, "snapshot", slow)
        clock = Clock(100.0)
        index = HoldIndex(hs, env="prod", clock=clock)
        go = threading.Barrier(4)
        views: list[int] = []

        def decide() -> None:
            go.wait()
            views.append(len(index.active()))

        for rnd in range(2):  # no view yet: one reads, the others wait for it; then a stale view: kept meanwhile
            threads = [threading.Thread(target=decide) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(reads) == rnd + 1 and views == [3] * 4 * (rnd + 1)
            clock.t += hd.CACHE_SECONDS
    finally:
        hs.close()


def test_an_invalidation_is_not_lost_to_a_refresh_in_flight(tmp_path: Path) -> None:
    """Finding 9 (probe_herd part 2)."""
    hs, other = HoldStore.open(tmp_path / "g.db"), HoldStore.open(tmp_path / "g.db")
    real, read, release = hs.snapshot, threading.Event(), threading.Event()

    def held_back(known: int | None, env: str | None = None) -> Any:
        out = real(known, env)  # read before the hold is placed ...
        read.set()
        release.wait(10)  # ... and returned after the API's invalidate()
        return out

    hs.snapshot = held_back  # type: ignore[method-assign]
    index = HoldIndex(hs)
    t = threading.Thread(target=index.current)
    t.start()
    read.wait(10)
    h = other.place("identity", TRAINER.uri, "burst", "modelseal-monitor")
    index.invalidate()
    release.set()
    t.join()
    hs.snapshot = real  # type: ignore[method-assign]
    try:
        assert index.lookup("identity", TRAINER.uri) == h  # at once, not 2 s later
    finally:
        hs.close()
        other.close()


def test_a_recreated_generation_row_cannot_hide_a_hold(tmp_path: Path) -> None:
    """Finding 10 (probe_generation)."""
    hs = HoldStore.open(tmp_path / "g.db")
    try:
        a = hs.place("identity", f"spiffe://{TD}/prod/service/a", "first", "m")
        index = HoldIndex(hs, cache_seconds=0)
        assert index.lookup("identity", a.subject) == a
        hs.run(lambda q: q("DELETE FROM gov_holds_generation"))  # a cleanup, a partial restore
        b = hs.place("identity", f"spiffe://{TD}/prod/service/b", "second", "m")
        assert index.lookup("identity", b.subject) == b
    finally:
        hs.close()


def test_a_malformed_hold_row_denies_with_an_audited_503(w: World, env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 8: the decider fails closed (``deny:unavailable``, 503), the list names the row."""
    h = place_now(w, "identity", WRITER.uri, "burst", "modelseal-monitor")
    with sqlite3.connect(w.gov.target) as c:  # a hand edit gone wrong (the generation moved with it)
        c.execute("UPDATE gov_holds SET placed_at = 'not-a-number'")
        c.execute("UPDATE gov_holds_generation SET value = value + 1")
    hs = HoldStore.open(w.gov.target)
    with pytest.raises(hd.HoldsUnreadable, match="malformed"):
        hs.active()
    hs.close()
    assert w.gov.authz.holds is not None
    w.gov.authz.holds.invalidate()
    st, body = call(w, "officer1", "GET", "holds")
    assert st == 503 and message(body) == "authorization is unavailable; retry later"
    assert f"the holds cannot be read: a hold row is malformed: '{h.id}'" in caplog.text  # the officers' lead
    with pytest.raises(GovernanceError, match="cannot be read"):
        w.gov.authz.decide(parse(f"{USER}/officer1"), "hold.list", Resource("Governance", "holds", {"env": "prod"}))
    assert w.gov.audit.flush()
    assert [e.result for e in env.sink.events if e.operation == "authorize"][-2:] == ["deny:unavailable"] * 2
