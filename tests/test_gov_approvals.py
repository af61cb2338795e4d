"""Two-person approvals (governance.approvals) on SQLite and a real PostgreSQL 15: distinct
officers, never the requester, before expiry, pending only; the completing approval is
claimed by exactly one caller, however many race; and the [governance] settings."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelseal.errors import GovernanceError
from modelseal.governance.approvals import (
    Approvals,
    Conflict,
    Settings,
    UnknownApproval,
    approval_digest,
    parse_duration,
    parse_settings,
    settings,
)
from modelseal.governance.model import Resource
from tests.conftest import Env
from tests.test_gov_store import clean_pg, pg_url  # noqa: F401 (the module-scoped PostgreSQL fixture)

T0 = 1_800_000_000.0
ALICE = "spiffe://example.org/prod/user/alice"
O1, O2, O3, O4 = (f"spiffe://example.org/prod/user/officer{i}" for i in range(1, 5))
KEY = Resource("Key", "prod-kek", {"env": "prod"})


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        clean_pg(url)
        yield url
    else:
        yield str(tmp_path / "data" / "governance.db")


@pytest.fixture
def dbs(target: str) -> Iterator[Callable[[], Approvals]]:
    made: list[Approvals] = []

    def make() -> Approvals:
        made.append(Approvals.open(target))
        return made[-1]

    yield make
    for a in made:
        a.close()


def asked(db: Approvals, needs: int = 2, ttl: float = 86400.0) -> str:
    a = db.request("key.destroy", KEY, {"name": "prod-kek", "version": None}, ALICE, needs=needs, ttl=ttl, now=T0)
    return a.id


def test_two_officers_approve_and_the_second_claims(dbs: Callable[[], Approvals]) -> None:
    db = dbs()
    a = db.request("key.destroy", KEY, {"name": "prod-kek"}, ALICE, now=T0)
    assert a.state == "pending" and a.needs == 2 and a.expires == T0 + 86400 and len(a.id) == 16
    assert a.digest == approval_digest("key.destroy", KEY, {"name": "prod-kek"}, ALICE, T0)
    assert [p.id for p in db.pending(now=T0 + 1)] == [a.id]
    first, claimed = db.approve(a.id, O1, now=T0 + 10)
    assert not claimed and first.state == "pending" and first.approvers == (O1,)
    second, claimed = db.approve(a.id, O2, now=T0 + 20)
    assert claimed and second.state == "running" and second.approvers == (O1, O2)
    assert db.pending(now=T0 + 21) == []
    with pytest.raises(Conflict, match="is running, not pending"):
        db.approve(a.id, O3, now=T0 + 30)
    done = db.finish(a.id, {"destroyed": [1]}, now=T0 + 40)
    assert done.state == "done" and done.result == {"destroyed": [1]} and done.finished == T0 + 40
    with pytest.raises(GovernanceError, match="not running"):
        db.finish(a.id, {"again": True})
    assert db.get(a.id).to_json(T0 + 50)["state"] == "done"


def test_self_approval_is_refused(dbs: Callable[[], Approvals]) -> None:
    db = dbs()
    aid = asked(db)
    with pytest.raises(Conflict, match="nobody approves their own request"):
        db.approve(aid, ALICE, now=T0 + 1)
    assert db.get(aid).approvers == ()


def test_a_second_approval_by_the_same_officer_is_refused(dbs: Callable[[], Approvals]) -> None:
    db = dbs()
    aid = asked(db)
    db.approve(aid, O1, now=T0 + 1)
    with pytest.raises(Conflict, match="already approved"):
        db.approve(aid, O1, now=T0 + 2)
    a = db.get(aid)
    assert a.approvers == (O1,) and a.state == "pending"


def test_an_approval_after_expiry_is_refused(dbs: Callable[[], Approvals]) -> None:
    db = dbs()
    aid = asked(db, ttl=3600)
    db.approve(aid, O1, now=T0 + 100)
    with pytest.raises(Conflict, match="has expired"):
        db.approve(aid, O2, now=T0 + 3600)
    a = db.get(aid)
    assert a.state == "pending" and a.state_at(T0 + 3600) == "expired" and db.pending(now=T0 + 3600) == []


def test_deny_ends_a_request_for_good(dbs: Callable[[], Approvals]) -> None:
    db = dbs()
    aid = asked(db)
    d = db.deny(aid, O1, "not during the freeze", now=T0 + 5)
    assert d.state == "denied" and d.decided_by == O1 and d.reason == "not during the freeze"
    with pytest.raises(Conflict, match="is denied"):
        db.approve(aid, O2, now=T0 + 6)
    with pytest.raises(Conflict, match="is denied"):
        db.deny(aid, O2, now=T0 + 6)


def test_a_failed_run_is_recorded_and_never_claimed_again(dbs: Callable[[], Approvals]) -> None:
    db = dbs()
    aid = asked(db, needs=1)
    _, claimed = db.approve(aid, O1, now=T0 + 1)
    assert claimed
    f = db.finish(aid, error="the provider is unreachable", now=T0 + 2)
    assert f.state == "failed" and f.error == "the provider is unreachable"
    with pytest.raises(Conflict):
        db.approve(aid, O2, now=T0 + 3)


@pytest.mark.parametrize(
    ("call", "why"),
    [
        (lambda db: db.request("key.create", KEY, {}, ALICE), "not a two-person operation"),
        (lambda db: db.request("key.destroy", KEY, {}, ALICE, needs=0), "1 to 10"),
        (lambda db: db.request("key.destroy", KEY, {}, ALICE, ttl=8 * 86400), "within 7 days"),
        (lambda db: db.request("key.destroy", KEY, {"x": float("inf")}, ALICE), "plain JSON"),
        (lambda db: db.request("key.destroy", KEY, {"x": "a" * 20000}, ALICE), "at most"),
        (lambda db: db.get("../etc"), "16 lowercase hex"),
        (lambda db: db.approve("0123456789ABCDEF", O1), "16 lowercase hex"),
        (lambda db: db.deny("0" * 16, O1, "two\nlines"), "one printable line"),
    ],
)
def test_bad_requests(dbs: Callable[[], Approvals], call: Callable[[Approvals], object], why: str) -> None:
    with pytest.raises(GovernanceError, match=why):
        call(dbs())


def test_an_unknown_approval(dbs: Callable[[], Approvals]) -> None:
    with pytest.raises(UnknownApproval, match="no approval request"):
        dbs().approve("0" * 16, O1)


def test_racing_final_approvals_claim_exactly_once_threads(dbs: Callable[[], Approvals]) -> None:
    """Four officers race the completing approval, each through its own connection: one
    claims the run; the others are refused, and the operation runs once."""
    aid = asked(dbs())
    dbs().approve(aid, O1, now=T0 + 1)
    racers = [(o, dbs()) for o in (O2, O3, O4, "spiffe://example.org/prod/user/officer5")]
    barrier = threading.Barrier(len(racers))
    runs: list[str] = []
    refused: list[str] = []

    def race(officer: str, db: Approvals) -> None:
        barrier.wait()
        try:
            _, claimed = db.approve(aid, officer, now=T0 + 2)
        except Conflict as e:
            refused.append(str(e))
            return
        if claimed:
            runs.append(officer)  # the operation itself
            db.finish(aid, {"ran_by": officer}, now=T0 + 3)

    threads = [threading.Thread(target=race, args=r) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1 and len(refused) == 3
    final = dbs().get(aid)
    assert final.state == "done" and final.result == {"ran_by": runs[0]} and len(final.approvers) == 2


def _racer(target: str, aid: str, officer: str, start: object, out: object) -> None:
    db = Approvals.open(target)
    start.wait()  # type: ignore[attr-defined]
    try:
        _, claimed = db.approve(aid, officer, now=T0 + 2)
        out.put((officer, "claimed" if claimed else "counted"))  # type: ignore[attr-defined]
    except Conflict:
        out.put((officer, "refused"))  # type: ignore[attr-defined]
    finally:
        db.close()


def test_racing_final_approvals_claim_exactly_once_processes(target: str, dbs: Callable[[], Approvals]) -> None:
    aid = asked(dbs())
    dbs().approve(aid, O1, now=T0 + 1)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    officers = [f"spiffe://example.org/prod/user/racer{i}" for i in range(4)]
    procs = [ctx.Process(target=_racer, args=(target, aid, o, start, out)) for o in officers]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    got = sorted(out.get(timeout=5)[1] for _ in procs)
    assert got == ["claimed", "refused", "refused", "refused"]
    assert dbs().get(aid).state == "running"


def test_settings_defaults_and_config(env: Env) -> None:
    assert settings() == Settings()
    cfg = env.home / "config.toml"
    cfg.write_text('[governance]\napprovals = 3\napproval_ttl = "12h"\nbreak_glass_for = "1h"\nkey = "local:gov2"\n')
    os.chmod(cfg, 0o600)
    assert settings() == Settings("local:gov2", 3, 12 * 3600.0, 3600.0)
    assert parse_duration("90d") == 90 * 86400 and parse_duration("2w") == 14 * 86400 and parse_duration("30") == 30


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"approvals": 0}, "from 1 to 10"),
        ({"approvals": True}, "from 1 to 10"),
        ({"approval_ttl": "8d"}, "from 1m to 7d"),
        ({"approval_ttl": "soon"}, "takes a duration"),
        ({"break_glass_for": "30s"}, "from 1m to 7d"),
        ({"key": "nokey"}, "key URI"),
        ("x", "must be a table"),
    ],
)
def test_bad_settings(table: object, why: str) -> None:
    with pytest.raises(GovernanceError, match=why):
        parse_settings(table)
