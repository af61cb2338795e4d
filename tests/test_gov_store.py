"""Bindings, grants and break-glass rows (governance.store) on SQLite and a real PostgreSQL 15:
the rules every binding passes at bind, separation of duties by pattern overlap, expiry,
last use, and the per-identity cache that follows binds and unbinds of other processes."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelseal.errors import GovernanceError
from modelseal.governance import model
from modelseal.governance.model import Binding, identity_matches
from modelseal.governance.store import GovStore, open_target, patterns_overlap
from tests.services import postgres

T0 = 1_800_000_000.0
DAY = 86400.0
ALICE = "spiffe://example.org/prod/user/alice"
TRAINER = "spiffe://example.org/prod/service/trainer"
GOV_TABLES = (
    "gov_bindings",
    "gov_generation",
    "gov_mfa",
    "gov_otp_used",
    "gov_approvals",
    "gov_approval_votes",
    "gov_reviews",
    "gov_attestations",
)


def binding(pattern: str, role: str, env: str = "prod", expires: float = T0 + 90 * DAY, **kw: object) -> Binding:
    return Binding("", pattern, role, env, expires, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres() as url:
        yield url


def clean_pg(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for t in GOV_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {t}")


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One governance database: a SQLite file, or a real PostgreSQL emptied before each test."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        clean_pg(url)
        yield url
    else:
        yield open_target(tmp_path / "data", None)


@pytest.fixture
def stores(target: str) -> Iterator[Callable[[], GovStore]]:
    made: list[GovStore] = []

    def make() -> GovStore:
        made.append(GovStore.open(target))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_bind_list_and_active_for_exact_and_pattern(stores: Callable[[], GovStore]) -> None:
    s = stores()
    a = s.bind(binding(ALICE, "security-officer"), by="bootstrap", now=T0)
    p = s.bind(binding("spiffe://example.org/prod/service/*", "reader"), by=ALICE, now=T0 + 1)
    assert len(a.id) == 16 and a.created_by == "bootstrap" and a.created == T0
    assert [b.id for b in s.bindings(now=T0)] == [a.id, p.id]
    assert s.active_for(ALICE, T0) == (a,)
    assert [b.role for b in s.active_for(TRAINER, T0)] == ["reader"]
    assert s.active_for("spiffe://example.org/prod/service/a/b", T0) == ()  # * never crosses /
    assert s.active_for("spiffe://example.org/dev/service/trainer", T0) == ()


def test_a_binding_that_would_break_separation_of_duties_is_refused(stores: Callable[[], GovStore]) -> None:
    s = stores()
    admin = s.bind(binding("spiffe://example.org/prod/service/*", "key-admin"), by=ALICE, now=T0)
    with pytest.raises(GovernanceError) as e:
        s.bind(binding(TRAINER, "reader"), by=ALICE, now=T0)
    msg = str(e.value)
    assert "separation of duties" in msg and admin.id in msg and "key-admin" in msg and "reader" in msg
    assert "service/trainer" in msg and "service/*" in msg
    with pytest.raises(GovernanceError, match="separation of duties"):  # the other way round, and a grant too
        s.bind(binding(TRAINER, "publisher", kind="grant", reason="x", expires=T0 + 3600), by=ALICE, now=T0)
    assert [b.id for b in s.bindings(now=T0)] == [admin.id]  # nothing was written
    # Neither another environment, nor a pattern no identity shares, nor a role outside the rule conflicts.
    s.bind(binding("spiffe://example.org/dev/service/trainer", "reader", env="dev"), by=ALICE, now=T0)
    s.bind(binding("spiffe://example.org/prod/user/*", "reader"), by="bootstrap", now=T0)  # never by a user
    s.bind(binding(TRAINER, "auditor"), by=ALICE, now=T0)


def test_separation_of_duties_counts_only_active_bindings(stores: Callable[[], GovStore]) -> None:
    s = stores()
    s.bind(binding(TRAINER, "reader", kind="grant", reason="debug", expires=T0 + 3600), by=ALICE, now=T0)
    with pytest.raises(GovernanceError, match="separation of duties"):
        s.bind(binding(TRAINER, "key-admin"), by=ALICE, now=T0 + 60)
    s.bind(binding(TRAINER, "key-admin"), by=ALICE, now=T0 + 3601)  # the grant expired


def test_an_expired_grant_is_no_longer_active(stores: Callable[[], GovStore]) -> None:
    s = stores()
    g = s.bind(binding(TRAINER, "reader", kind="grant", reason="incident 42", expires=T0 + 2 * 3600), ALICE, T0)
    assert s.active_for(TRAINER, T0 + 3600) == (g,)
    assert s.active_for(TRAINER, T0 + 2 * 3600) == ()
    assert s.bindings(now=T0 + 3 * 3600) == []
    assert [b.id for b in s.bindings(include_expired=True, now=T0 + 3 * 3600)] == [g.id]


@pytest.mark.parametrize(
    ("b", "why"),
    [
        (binding(ALICE, "reader", expires=T0 + 367 * DAY), "within 366 days"),
        (binding(ALICE, "reader", expires=T0 - 1), "expire in the future"),
        (binding(ALICE, "reader", kind="grant", reason="r", expires=T0 + 8 * DAY), "never permanent"),
        (binding(ALICE, "reader", kind="grant", expires=T0 + 3600), "needs a reason"),
        (binding(ALICE, "reader", kind="break-glass", reason="  ", expires=T0 + 3600), "needs a reason"),
        (binding(ALICE, "reader", kind="grant", reason="a\nb", expires=T0 + 3600), "one printable line"),
        (binding(ALICE, "root"), "unknown role"),
        (binding(ALICE, "break-glass"), "only ever a break-glass window"),
        (binding(ALICE, "reader", kind="forever"), "unknown binding kind"),
        (binding("spiffe://example.org/prod/user/**", "reader"), "is not spiffe://"),
        (binding("spiffe://example.org/prod/user/a?", "reader"), "is not spiffe://"),
        (binding("spiffe://example.org/prod/user", "reader"), "DOMAIN/ENV/KIND/NAME"),
        (binding("spiffe://*.org/prod/user/alice", "reader"), "is not spiffe://"),
        (binding("spiffe://example.org/dev/user/alice", "reader"), "of environment 'dev', not 'prod'"),
        (binding(ALICE, "reader", env="Prod"), "invalid environment"),
    ],
)
def test_bad_bindings_are_refused(stores: Callable[[], GovStore], b: Binding, why: str) -> None:
    s = stores()
    with pytest.raises(GovernanceError, match=why):
        s.bind(b, by=ALICE, now=T0)
    assert s.bindings(include_expired=True) == []


def test_every_role_and_kind_at_its_limit_is_accepted(stores: Callable[[], GovStore]) -> None:
    s = stores()
    s.bind(binding(ALICE, "auditor", expires=T0 + model.MAX_BINDING), by="x", now=T0)
    s.bind(binding(ALICE, "reader", kind="grant", reason="r", expires=T0 + model.MAX_GRANT), by="x", now=T0)
    bg = s.bind(binding(ALICE, "break-glass", kind="break-glass", reason="r", expires=T0 + 3600), by="x", now=T0)
    assert bg.kind == "break-glass" and {b.kind for b in s.active_for(ALICE, T0)} == set(model.KINDS)


def test_unbind_and_the_cache_of_another_process_follows(stores: Callable[[], GovStore]) -> None:
    writer, reader = stores(), stores()
    assert reader.active_for(ALICE, T0) == ()  # cached: empty
    b = writer.bind(binding(ALICE, "security-officer"), by="x", now=T0)
    assert reader.active_for(ALICE, T0) == (b,)
    assert writer.unbind(b.id, by=ALICE) == b
    assert reader.active_for(ALICE, T0) == ()
    with pytest.raises(GovernanceError, match="no binding"):
        writer.unbind(b.id, by=ALICE)


def test_touch_records_the_last_use_at_most_once_a_minute(stores: Callable[[], GovStore]) -> None:
    s = stores()
    b = s.bind(binding(ALICE, "auditor"), by="x", now=T0)
    s.touch([b.id], T0 + 10)
    s.touch([b.id], T0 + 50)  # within the minute: no write
    assert s.get(b.id) is not None and s.get(b.id).last_used == T0 + 10  # type: ignore[union-attr]
    other = stores()  # another process's store writes on its own schedule, the row still refuses
    other.touch([b.id], T0 + 30)
    assert s.get(b.id).last_used == T0 + 10  # type: ignore[union-attr]
    s.touch([b.id, b.id], T0 + 75)
    assert s.get(b.id).last_used == T0 + 75  # type: ignore[union-attr]


def test_racing_binds_cannot_both_break_separation_of_duties(stores: Callable[[], GovStore]) -> None:
    a, b = stores(), stores()
    results: list[str] = []
    barrier = threading.Barrier(2)

    def run(s: GovStore, role: str) -> None:
        barrier.wait()
        try:
            s.bind(binding(TRAINER, role), by=ALICE, now=T0)
            results.append("ok")
        except GovernanceError as e:
            results.append(str(e))

    threads = [threading.Thread(target=run, args=(a, "key-admin")), threading.Thread(target=run, args=(b, "reader"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1 and any("separation of duties" in r for r in results)
    assert len(a.bindings(now=T0)) == 1


def _brute_overlap(p: str, q: str, alphabet: str = "ab", n: int = 5) -> bool:
    words = ("".join(w) for k in range(n + 1) for w in itertools.product(alphabet, repeat=k))
    return any(identity_matches(p, w) and identity_matches(q, w) for w in words)


def test_pattern_overlap_matches_a_brute_force_search() -> None:
    assert patterns_overlap("spiffe://d/prod/service/*", "spiffe://d/prod/service/x")
    assert not patterns_overlap("spiffe://d/prod/service/*", "spiffe://d/prod/user/x")
    assert patterns_overlap("spiffe://d/prod/*/a*", "spiffe://d/prod/user/*b")
    assert not patterns_overlap("spiffe://d/prod/user/a*", "spiffe://d/prod/user/b*")
    rng = random.Random(13)
    for _ in range(600):
        p, q = ("".join(rng.choice("ab*") for _ in range(rng.randint(1, 4))) for _ in range(2))
        assert patterns_overlap(p, q) == _brute_overlap(p, q), (p, q)


def test_open_target(tmp_path: Path) -> None:
    assert open_target(tmp_path, None) == str(tmp_path / "governance.db")
    assert open_target(tmp_path, "postgresql://u@h/db") == "postgresql://u@h/db"
    assert open_target(tmp_path, "sqlite:///srv/reg.db") == "/srv/reg.db"
    with pytest.raises(ValueError, match="password"):
        open_target(tmp_path, "postgresql://u:secret@h/db")
    with pytest.raises(ValueError, match="--db takes"):
        open_target(tmp_path, "mysql://h/db")
