"""Holds (governance.holds, issue 14 section 4 "Respond"): the store on SQLite and a real
PostgreSQL 15 (idempotent place, release rules, subject validation), the decider's 2 s
cached view on an injected clock, the deny ahead of Cedar (identity, source, key: unwrap
denied, wrap allowed) and its audit record, the expired-grant counter, the access review's
``held`` flag, and end to end against a real ``modelseal serve`` subprocess: an officer with
TOTP places and releases through the CLI, a reader cannot, a release without a code is
refused, and after the release the identity is served again."""

from __future__ import annotations

import functools
import io
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from modelseal import cli as cli_mod
from modelseal.audit.events import MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import AccessDenied, GovernanceError
from modelseal.governance import review
from modelseal.governance.holds import (
    CACHE_SECONDS,
    Hold,
    HoldChanged,
    HoldIndex,
    HoldReleased,
    HoldStore,
    UnknownHold,
    check_subject,
    source_form,
)
from modelseal.governance.model import Binding, Resource
from modelseal.governance.store import GovStore
from modelseal.pki.identity import Identity
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.reference import Endpoint
from modelseal.registry.transport import Transport
from modelseal.server import authz, tls
from modelseal.server.hygiene import source_of
from modelseal.telemetry.metrics import REGISTRY
from tests.conftest import Env
from tests.oci_helpers import Client
from tests.push_pull_helpers import TD, issue_dir, make_pki, modelseal_serve
from tests.services import postgres
from tests.test_access_cli import Otp

T0 = 1_800_000_000.0
TRAINER = Identity.of(TD, "prod", "service", "trainer")
WRITER = Identity.of(TD, "prod", "service", "writer")
OFFICER = f"spiffe://{TD}/prod/user/officer1"
REPO = Resource("Repository", "models/llama", {"env": "prod"})
KEY = Resource("Key", "llama-prod", {"env": "prod"})
KEY_CTX = {"artifact_env": "prod"}


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "gov" / "governance.db")
    import psycopg

    url: str = request.getfixturevalue("pg_url")
    with psycopg.connect(url, autocommit=True) as conn:
        for t in ("gov_holds", "gov_holds_generation"):
            conn.execute(f"DROP TABLE IF EXISTS {t}")
    return url


@pytest.fixture
def holds(target: str) -> Iterator[HoldStore]:
    s = HoldStore.open(target)
    yield s
    s.close()


# -- the store -----------------------------------------------------------------------------


def test_place_is_idempotent_and_release_ends_only_an_active_hold(holds: HoldStore, target: str) -> None:
    h = holds.place("identity", TRAINER.uri, "unwrap burst", "modelseal-monitor", now=T0)
    assert h.env == "prod" and h.detections == 1  # an identity's hold is in the identity's environment
    again, new = holds.place_once("identity", TRAINER.uri, "another detector", OFFICER, now=T0 + 5)
    assert not new and again.id == h.id and again.reason == "unwrap burst"  # the first hold stands
    assert again.detections == 2 and again.last_seen == T0 + 5 and holds.get(h.id) == again  # counted on it
    src = holds.place("source", "10.1.2.3", "handshake failures", "modelseal-monitor", now=T0 + 1, env="prod")
    key = holds.place("key", "llama-prod", "bulk unwraps", "modelseal-monitor", now=T0 + 2, env="prod")
    other = HoldStore.open(target)  # another worker or instance on the same database
    try:
        assert [x.id for x in other.active()] == [h.id, src.id, key.id]
        assert other.counts() == {"identity": 1, "key": 1, "source": 1}
        gone = other.release(h.id, OFFICER, "reviewed: a retraining job", now=T0 + 60)
    finally:
        other.close()
    assert not gone.active and gone.released_by == OFFICER and gone.release_reason == "reviewed: a retraining job"
    assert holds.get(h.id) == gone and [x.id for x in holds.active()] == [src.id, key.id]
    with pytest.raises(HoldReleased, match="released already"):
        holds.release(h.id, OFFICER, "twice")
    with pytest.raises(UnknownHold, match="no hold"):
        holds.release("0123456789abcdef", OFFICER, "no such")
    with pytest.raises(GovernanceError, match="one printable line"):
        holds.release(src.id, OFFICER, "")  # a release says why
    with pytest.raises(GovernanceError, match="16 lowercase hex"):
        holds.release("'; DROP TABLE gov_holds; --", OFFICER, "x")
    fresh = holds.place("identity", TRAINER.uri, "again", "modelseal-monitor", now=T0 + 70)
    assert fresh.id != h.id and fresh.active  # a released hold is history; a new one is new
    assert [x.id for x in holds.all()] == [h.id, src.id, key.id, fresh.id]
    assert holds.counts()["identity"] == 1


def test_concurrent_places_make_one_hold(holds: HoldStore, target: str) -> None:
    stores = [HoldStore.open(target) for _ in range(4)]
    out: list[str] = []
    go = threading.Barrier(len(stores))

    def place(s: HoldStore) -> None:
        go.wait()
        out.append(s.place("source", "192.0.2.7", "burst", "modelseal-monitor", env="prod").id)

    threads = [threading.Thread(target=place, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert len(out) == 4 and len(set(out)) == 1 and len(holds.active()) == 1


def test_a_detection_racing_a_release_ends_in_a_defined_state(holds: HoldStore, target: str) -> None:
    """Red-team finding 16: either the release wins and the detection places a new hold
    after it, or the detection lands first and the release (of what the officer read) loses."""
    stores = [HoldStore.open(target) for _ in range(2)]
    outcomes = set()
    try:
        for _ in range(5):
            h = holds.place("key", "llama-prod", "first detection", "modelseal-monitor", env="prod")
            go, out = threading.Barrier(2), {}

            def run(name: str, fn: Callable[[], object]) -> None:
                go.wait()
                try:
                    out[name] = fn()
                except Exception as e:  # HoldChanged, or anything else: judged below
                    out[name] = e

            rel = functools.partial(stores[0].release, h.id, OFFICER, "reviewed", env="prod", seen=h.detections)
            det = functools.partial(
                stores[1].place_once, "key", "llama-prod", "second", "modelseal-monitor", env="prod"
            )
            threads = [threading.Thread(target=run, args=a) for a in (("release", rel), ("place", det))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            placed, created = out["place"]  # type: ignore[misc]
            live = [x for x in holds.active(env="prod") if x.subject == "llama-prod"]
            if isinstance(out["release"], HoldChanged):  # the release lost: the hold stands, the detection counted
                assert not created and placed.id == h.id and [(x.id, x.detections) for x in live] == [(h.id, 2)]
            else:  # the release won: the detection is a new hold, placed after it
                assert isinstance(out["release"], Hold) and not out["release"].active
                assert created and placed.id != h.id and [x.id for x in live] == [placed.id]
            outcomes.add(created)
            for x in live:
                holds.release(x.id, OFFICER, "next round")
    finally:
        for s in stores:
            s.close()
    assert outcomes  # (which side wins is the scheduler's business; both are defined)


@pytest.mark.parametrize(
    ("kind", "subject", "why"),
    [
        ("identity", f"spiffe://{TD}/prod/service/*", "invalid identity"),
        ("identity", f"spiffe://{TD}/prod/service", "invalid identity"),
        ("identity", f"spiffe://{TD}/prod/service/a/b", "invalid identity"),
        ("identity", "https://example.org/prod/service/a", "invalid identity"),
        ("identity", f"spiffe://{TD}/prod/robot/a", "invalid identity"),
        ("identity", 7, "identity URI"),
        ("key", "../etc/passwd", "invalid broker key name"),
        ("key", ".hidden", "invalid broker key name"),
        ("key", "a" * 129, "invalid broker key name"),
        ("source", "2001:db8:1:2::7", "hold '2001:db8:1:2::/64'"),
        ("source", "2001:db8:1:2::/128", "hold '2001:db8:1:2::/64'"),  # the server records an IPv6 /64
        ("source", "2001:db8::/31", "invalid source"),
        ("source", "2001:DB8::/64", "hold '2001:db8::/64'"),
        ("source", "2001:db8:1::1/48", "hold '2001:db8:1::/48'"),  # host bits are zero
        ("source", "::ffff:10.0.0.1", "hold '10.0.0.1'"),
        ("source", "::ffff:203.0.113.9/128", "hold '203.0.113.9'"),  # finding 11: not '::/64'
        ("source", "::ffff:10.0.0.0/120", "hold '10.0.0.0/24'"),
        ("source", "::ffff:0:0/96", "invalid source"),
        ("source", "10.0.0.1/32", "hold '10.0.0.1'"),
        ("source", "10.0.0.1/24", "hold '10.0.0.0/24'"),
        ("source", "10.0.0.0/15", "invalid source"),
        ("source", "010.0.0.1", "invalid source"),
        ("source", "fe80::1%eth0", "invalid source"),
        ("source", "?", "invalid source"),
        ("source", "registry.example.org", "invalid source"),
        ("host", "10.0.0.1", "unknown hold kind"),
    ],
)
def test_bad_subjects_are_refused(kind: str, subject: object, why: str) -> None:
    with pytest.raises(GovernanceError, match=re.escape(why)):
        check_subject(kind, subject)


def test_good_subjects_and_the_source_form_of_the_server(tmp_path: Path) -> None:
    assert check_subject("identity", TRAINER.uri) == TRAINER.uri
    assert check_subject("key", "llama-prod.v2_a") == "llama-prod.v2_a"
    for peer in [("10.0.0.1", 5), ("2001:db8:1:2:3:4:5:6", 5, 0, 0), ("::ffff:192.0.2.1", 5, 0, 0), ("::1", 1, 0, 0)]:
        printed = source_of(peer)
        assert source_form(peer[0]) == printed and check_subject("source", printed) == printed
    for net in ("10.1.0.0/16", "192.0.2.0/24", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1:2::/64"):
        assert check_subject("source", net) == net
    s = HoldStore.open(tmp_path / "g.db")
    try:
        with pytest.raises(GovernanceError, match="one printable line"):
            s.place("identity", TRAINER.uri, "two\nlines", "modelseal-monitor")
        with pytest.raises(GovernanceError, match="one printable line"):
            s.place("identity", TRAINER.uri, "x" * 501, "modelseal-monitor")
        with pytest.raises(GovernanceError, match="names its environment"):
            s.place("source", "10.0.0.1", "no env", "modelseal-monitor")
        with pytest.raises(GovernanceError, match="identity's environment"):
            s.place("identity", TRAINER.uri, "wrong env", "modelseal-monitor", env="dev")
        assert s.active() == []
    finally:
        s.close()


# -- the decider's view and the decision ------------------------------------------------------


def test_the_index_rereads_at_most_every_two_seconds(tmp_path: Path) -> None:
    target = tmp_path / "g.db"
    placer, mine = HoldStore.open(target), HoldStore.open(target)
    reads: list[bool] = []
    real = mine.snapshot

    def counted(known: int | None, env: str | None = None) -> tuple[int, list[object] | None]:
        gen, rows = real(known, env)
        reads.append(rows is not None)
        return gen, rows  # type: ignore[return-value]

    mine.snapshot = counted  # type: ignore[method-assign]
    clock = Clock(100.0)
    index = HoldIndex(mine, clock=clock)
    try:
        assert index.lookup("identity", TRAINER.uri) is None and reads == [True]
        h = placer.place("identity", TRAINER.uri, "burst", "modelseal-monitor")
        clock.t += CACHE_SECONDS - 0.5
        assert index.lookup("identity", TRAINER.uri) is None and reads == [True]  # within the window: cached
        clock.t += 0.5
        assert index.lookup("identity", TRAINER.uri) == h and reads == [True, True]
        clock.t += CACHE_SECONDS
        assert index.lookup("identity", TRAINER.uri) == h and reads == [True, True, False]  # generation only
        placer.release(h.id, OFFICER, "reviewed")
        index.invalidate()  # the API does this on its own worker's change
        assert index.lookup("identity", TRAINER.uri) is None and index.active() == ()
    finally:
        placer.close()
        mine.close()


def _decider(tmp_path: Path, sink: MemorySink) -> tuple[authz.Authz, HoldStore, GovStore]:
    store = GovStore.open(tmp_path / "g.db")
    store.bind(Binding("", TRAINER.uri, "reader", "prod", T0 + 86400), by="test", now=T0)
    store.bind(Binding("", WRITER.uri, "publisher", "prod", T0 + 86400), by="test", now=T0)
    hs = HoldStore.open(tmp_path / "g.db")
    a = authz.Authz(store, None, "prod", TD, sink, now=Clock(T0 + 10), holds=HoldIndex(hs, clock=Clock()))
    return a, hs, store


def test_held_identity_source_and_key_are_denied_ahead_of_cedar(tmp_path: Path) -> None:
    sink = MemorySink()
    a, hs, store = _decider(tmp_path, sink)
    try:
        assert a.decide(TRAINER, "pull", REPO, source="10.0.0.1").allowed
        h = hs.place("identity", TRAINER.uri, "unwrap burst at 03:00", "modelseal-monitor")
        assert a.decide(TRAINER, "pull", REPO).allowed  # the index is 2 s stale by design
        assert a.holds is not None
        a.holds.invalidate()
        d = a.decide(TRAINER, "pull", REPO, source="10.0.0.1")
        assert not d.allowed and d.policies == (f"hold:{h.id}",)
        assert d.reason == f"held pending review (hold {h.id})"  # finding 7: the reason is not the suspect's
        assert not a.decide(TRAINER, "access.list", Resource("Governance", "bindings", {"env": "prod"})).allowed
        assert a.decide(WRITER, "push", REPO, source="10.0.0.1").allowed  # only the held identity
        # a source: every identity from it, nobody elsewhere
        s = hs.place("source", "10.0.0.9", "handshake failures", "modelseal-monitor", env="prod")
        a.holds.invalidate()
        d = a.decide(WRITER, "push", REPO, source="10.0.0.9")
        assert not d.allowed and d.policies == (f"hold:{s.id}",) and "handshake failures" not in d.reason
        assert a.decide(WRITER, "push", REPO, source="10.0.0.1").allowed
        # a key: unwrap and rewrap denied, wrap still allowed
        hs.release(h.id, OFFICER, "reviewed")
        k = hs.place("key", KEY.id, "bulk unwraps", "modelseal-monitor", env="prod")
        a.holds.invalidate()
        d = a.decide(TRAINER, "key.unwrap", KEY, KEY_CTX, source="10.0.0.1")
        assert not d.allowed and d.policies == (f"hold:{k.id}",)
        assert not a.decide(WRITER, "key.rewrap", KEY, KEY_CTX).allowed
        assert a.decide(WRITER, "key.wrap", KEY, KEY_CTX).allowed
        other = Resource("Key", "other-key", {"env": "prod"})
        assert a.decide(TRAINER, "key.unwrap", other, KEY_CTX).allowed
        assert a.decide(TRAINER, "pull", REPO).allowed  # released: served again
    finally:
        a.close()
        hs.close()
        store.close()
    results = [(e.actor, e.key, e.result, e.source) for e in sink.events if e.result.startswith("deny")]
    assert results == [
        (TRAINER.uri, "pull Repository:models/llama", f"deny:hold:{h.id}", "10.0.0.1"),
        (TRAINER.uri, "access.list Governance:bindings", f"deny:hold:{h.id}", None),
        (WRITER.uri, "push Repository:models/llama", f"deny:hold:{s.id}", "10.0.0.9"),
        (TRAINER.uri, "key.unwrap Key:llama-prod", f"deny:hold:{k.id}", "10.0.0.1"),
        (WRITER.uri, "key.rewrap Key:llama-prod", f"deny:hold:{k.id}", None),
    ]


def test_an_unreadable_hold_table_denies(tmp_path: Path) -> None:
    sink = MemorySink()
    a, hs, store = _decider(tmp_path, sink)
    try:
        hs.run(lambda q: q("DROP TABLE gov_holds_generation"))
        with pytest.raises(GovernanceError, match="cannot be read"):
            a.decide(TRAINER, "pull", REPO)
        assert sink.events[-1].result == "deny:unavailable"
    finally:
        a.close()
        hs.close()
        store.close()


def test_a_denied_request_with_an_expired_grant_is_counted(tmp_path: Path) -> None:
    def count() -> float:
        return REGISTRY.get_sample_value("modelseal_expired_credentials_total", {"kind": "grant"}) or 0.0

    store = GovStore.open(tmp_path / "g.db")
    ghost = Identity.of(TD, "prod", "service", "ghost")
    store.bind(Binding("", ghost.uri, "reader", "prod", T0 + 3600, "grant", "INC-1"), by="test", now=T0)
    clock = Clock(T0 + 60)
    a = authz.Authz(store, None, "prod", TD, MemorySink(), now=clock)
    try:
        before = count()
        assert a.decide(ghost, "pull", REPO).allowed and count() == before
        clock.t = T0 + 7200
        assert not a.decide(ghost, "pull", REPO).allowed and count() == before + 1
        assert not a.decide(TRAINER, "pull", REPO).allowed and count() == before + 1  # no grant at all
    finally:
        a.close()
        store.close()


def test_the_review_flags_held_identities(tmp_path: Path) -> None:
    store, hs = GovStore.open(tmp_path / "g.db"), HoldStore.open(tmp_path / "g.db")
    try:
        exact = store.bind(Binding("", TRAINER.uri, "reader", "prod", T0 + 86400), by="test", now=T0)
        wide = store.bind(Binding("", f"spiffe://{TD}/prod/service/w*", "publisher", "prod", T0 + 86400), "t", T0)
        other = store.bind(Binding("", f"spiffe://{TD}/prod/user/ana", "auditor", "prod", T0 + 86400), "t", T0)
        h = hs.place("identity", TRAINER.uri, "burst", "modelseal-monitor")
        w = hs.place("identity", WRITER.uri, "exfiltration", "modelseal-monitor")
        hs.place("key", "llama-prod", "not an identity", "modelseal-monitor", env="prod")
        rv = review.build(store.bindings(now=T0), now=T0 + 1, holds=hs.active())
    finally:
        store.close()
        hs.close()
    by = {e["id"]: e for e in rv["entries"]}
    assert by[exact.id]["flags"] == ["held"] and by[exact.id]["holds"] == [{"id": h.id, "identity": TRAINER.uri}]
    assert by[wide.id]["flags"] == ["held"] and by[wide.id]["holds"] == [{"id": w.id, "identity": WRITER.uri}]
    assert by[other.id]["flags"] == [] and by[other.id]["holds"] == []
    assert rv["summary"]["held"] == 2 and rv["digest"] == review.digest_of(rv)
    assert "held" not in review.build([], now=T0)["summary"]  # without holds: the shape of before


# -- end to end: a real modelseal serve, the CLI -----------------------------------------------


def _cli(
    mp: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], folder: Path, *argv: str, stdin: str = ""
) -> tuple[int, str, str]:
    capsys.readouterr()
    mp.setenv("MODELSEAL_TLS_DIR", str(folder))
    mp.setattr(sys, "stdin", io.StringIO(stdin + "\n" if stdin else ""))
    rc = cli_mod.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _pull_status(ctx_dir: Path, port: int, hold_id: str = "") -> tuple[int, str]:
    c = Client(tls.client_context(ctx_dir), port)  # a fresh connection: any worker
    try:
        r = c.request("GET", "/v2/models/llama/tags/list")
        if r.status == 403:  # the held party is told the hold's id, never its reason (finding 7)
            assert f"held pending review (hold {hold_id})" in r.body.decode() and "burst" not in r.body.decode()
        return r.status, r.code()
    finally:
        c.close()


def test_officers_hold_and_release_through_a_running_server(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    p = make_pki(env)
    data = env.work / "data"
    gov = GovStore.open(data / "governance.db")
    for o in ("officer1", "officer2"):
        gov.bind(
            Binding("", f"spiffe://{TD}/prod/user/{o}", "security-officer", "prod", time.time() + 86400), "bootstrap"
        )
    gov.close()
    officers = {o: issue_dir(env, env.work / o, "user", o) for o in ("officer1", "officer2")}
    otp = Otp()
    with modelseal_serve(env.work, p.server_dir, p.client_dir, "--data", str(data), "--workers", "2") as port:
        monkeypatch.setenv("MODELSEAL_BROKER", f"127.0.0.1:{port}")
        monkeypatch.setenv("MODELSEAL_REGISTRY_PINS", ",".join(p.pins()))
        for o, folder in officers.items():
            with ApiClient(Transport([Endpoint("127.0.0.1", port)], folder, p.pins())) as api:
                uri = api.call("POST", "mfa/enroll", {})["uri"]
                otp.secrets[o] = parse_qs(urlsplit(uri).query)["secret"][0]
                api.call("POST", "mfa/confirm", {"otp": otp.code(o)})
        assert _pull_status(p.client_dir, port) == (404, "NAME_UNKNOWN")  # the trainer is a reader

        hold = ("access", "hold", "identity", TRAINER.uri, "--reason", "unwrap burst")
        rc, _, err = _cli(monkeypatch, capsys, p.client_dir, *hold, stdin="123456")
        assert rc == 17 and "denied" in err  # a reader (a service) cannot place a hold
        rc, out, err = _cli(monkeypatch, capsys, officers["officer1"], *hold, stdin=otp.code("officer1"))
        assert rc == 0 and f"  active  identity {TRAINER.uri}  " in out and f'by "{OFFICER}"' in out, err
        hid = out.split()[0]
        time.sleep(CACHE_SECONDS + 0.2)  # every worker's index is re-read within the window
        for _ in range(4):
            assert _pull_status(p.client_dir, port, hid) == (403, "DENIED")
        rc, out, err = _cli(monkeypatch, capsys, officers["officer2"], "access", "holds", "--json")
        assert rc == 0 and [(h["id"], h["kind"], h["subject"]) for h in json.loads(out)] == [
            (hid, "identity", TRAINER.uri)
        ], err
        rc, out, _ = _cli(monkeypatch, capsys, officers["officer2"], "access", "review")
        # the trainer is a reader and a publisher by a service/* pattern: both entries name the held identity
        assert rc == 0 and "2 held (suspended pending review)" in out
        assert f"suspended pending review: hold {hid}" not in out and out.count(f"pending review: hold {hid}") == 2
        assert f"suspended for {TRAINER.uri} pending review: hold {hid}" in out

        with ApiClient(Transport([Endpoint("127.0.0.1", port)], officers["officer2"], p.pins())) as api:
            with pytest.raises(AccessDenied, match="step-up MFA"):
                api.call("POST", f"holds/{hid}/release", {"reason": "no code"})
            with pytest.raises(GovernanceError, match="404 no hold"):
                api.call("POST", "holds/0123456789abcdef/release", {"reason": "x", "otp": otp.code("officer2")})
        rc, out, err = _cli(
            monkeypatch,
            capsys,
            officers["officer2"],
            "access",
            "release",
            hid,
            "--reason",
            "reviewed: a retraining job",
        )
        assert rc == 16 and "no OTP code given" in err  # the code comes from stdin, never argv
        release = ("access", "release", hid, "--reason", "reviewed: a retraining job")
        rc, out, err = _cli(monkeypatch, capsys, officers["officer2"], *release, stdin=otp.code("officer2"))
        assert rc == 0 and "released" in out and "reviewed: a retraining job" in out, err
        rc, out, err = _cli(monkeypatch, capsys, officers["officer1"], *release, stdin=otp.code("officer1"))
        assert rc == 16 and "409" in err and "released already" in err
        time.sleep(CACHE_SECONDS + 0.2)
        for _ in range(4):
            assert _pull_status(p.client_dir, port) == (404, "NAME_UNKNOWN")  # served again
        rc, out, _ = _cli(monkeypatch, capsys, officers["officer1"], "access", "holds")
        assert rc == 0 and out == ""
        rc, out, _ = _cli(monkeypatch, capsys, officers["officer1"], "access", "holds", "--all")
        assert rc == 0 and out.count("\n") == 1 and f"{hid}  released  identity {TRAINER.uri}" in out
    events = list(MerkleAuditLog(env.home / "audit.db").events())
    changes = [
        (e["operation"], e["key"], e["result"], e["actor"]) for e in events if e["operation"].startswith("hold-")
    ]
    assert changes == [
        ("hold-place", f"hold:{hid}", f"ok:identity:{TRAINER.uri} unwrap burst", OFFICER),
        (
            "hold-release",
            f"hold:{hid}",
            f"ok:identity:{TRAINER.uri} reviewed: a retraining job",
            f"spiffe://{TD}/prod/user/officer2",
        ),
    ]
    denied = [e for e in events if e["operation"] == "authorize" and e["result"] == f"deny:hold:{hid}"]
    assert len(denied) == 4 and all(e["actor"] == TRAINER.uri and e["source"] == "127.0.0.1" for e in denied)
