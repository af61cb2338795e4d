"""The access review (governance.review): last use and flags (expired, unused, separation-of-
duties conflicts), its digest, and attestations signed with the reviewer's certificate key
and verified against the certificate of the connection, kept as evidence."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from modelseal.errors import GovernanceError
from modelseal.governance import review
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore
from tests.conftest import Env
from tests.push_pull_helpers import issue_dir, make_pki

T0 = 1_800_000_000.0
DAY = 86400.0
ALICE = "spiffe://example.org/prod/user/alice"
TRAINER = "spiffe://example.org/prod/service/trainer"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GovStore]:
    s = GovStore.open(tmp_path / "data" / "governance.db")
    yield s
    s.close()


def test_flags_last_use_expired_unused_and_sod(store: GovStore, tmp_path: Path) -> None:
    used = store.bind(Binding("", ALICE, "security-officer", "prod", T0 + 90 * DAY), "boot", T0)
    idle = store.bind(Binding("", "spiffe://example.org/prod/user/bob", "auditor", "prod", T0 + 90 * DAY), "boot", T0)
    gone = store.bind(Binding("", TRAINER, "reader", "prod", T0 + 3600, "grant", "debug"), ALICE, T0)
    reader = store.bind(Binding("", "spiffe://example.org/prod/service/*", "reader", "prod", T0 + 90 * DAY), ALICE, T0)
    store.touch([used.id], T0 + 40 * DAY)
    # A conflicting row that bind refuses (made before the rule, or by hand): the review shows it.
    db = sqlite3.connect(tmp_path / "data" / "governance.db")
    db.execute(
        "INSERT INTO gov_bindings VALUES ('feedfacefeedface', ?, 'key-admin', 'prod', ?, 'binding', '', 'x', ?, NULL)",
        (TRAINER, T0 + 90 * DAY, T0),
    )
    db.commit()
    db.close()
    rv = review.build(store.bindings(include_expired=True), now=T0 + 41 * DAY)
    by = {e["id"]: e for e in rv["entries"]}
    assert len(by) == 5 and rv["format"] == review.FORMAT
    assert by[used.id]["flags"] == [] and by[used.id]["last_used"] == T0 + 40 * DAY
    assert by[idle.id]["flags"] == ["unused"] and by[idle.id]["last_used"] is None
    assert by[gone.id]["flags"] == ["expired", "unused"]
    assert by[reader.id]["flags"] == ["unused", "sod-conflict"] and by[reader.id]["conflicts_with"] == [
        "feedfacefeedface"
    ]
    assert "sod-conflict" in by["feedfacefeedface"]["flags"] and by["feedfacefeedface"]["conflicts_with"] == [reader.id]
    assert rv["summary"] == {"expired": 1, "unused": 4, "sod-conflict": 2}


def test_the_digest_covers_every_entry(store: GovStore) -> None:
    store.bind(Binding("", ALICE, "auditor", "prod", T0 + DAY), "boot", T0)
    rows = store.bindings(include_expired=True)
    rv = review.build(rows, now=T0 + 10)
    assert rv["digest"] == review.digest_of(rv) == review.build(rows, now=T0 + 10)["digest"]
    changed = dict(rv, entries=[dict(rv["entries"][0], role="reader")])
    assert review.digest_of(changed) != rv["digest"]
    assert review.build(rows, now=T0 + 11)["digest"] != rv["digest"]


def _leaf_der(folder: Path) -> bytes:
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def signed(env: Env, tmp_path: Path) -> Iterator[tuple[review.Reviews, dict[str, object], Path, Path]]:
    p = make_pki(env)
    officer = issue_dir(env, env.work / "officer", "user", "alice")
    other = issue_dir(env, env.work / "other", "user", "mallory")
    reviews = review.Reviews.open(str(tmp_path / "data" / "governance.db"))
    rv = review.build([Binding("x1", ALICE, "auditor", "prod", T0 + DAY)], now=T0)
    reviews.keep(rv, ALICE)
    del p
    yield reviews, rv, officer, other
    reviews.close()


def test_an_attestation_is_verified_against_the_connection_certificate(
    signed: tuple[review.Reviews, dict[str, object], Path, Path], env: Env
) -> None:
    reviews, rv, officer, other = signed
    digest = str(rv["digest"])
    key, me = review.load_reviewer(officer)
    assert me == ALICE
    sig = review.sign(key, digest, me)
    # A signature checked with another certificate than the one that made it is refused.
    with pytest.raises(GovernanceError, match="does not verify"):
        reviews.attest(digest, me, sig, _leaf_der(other), now=T0 + 60)
    # Signed for another reviewer, or another review: refused.
    with pytest.raises(GovernanceError, match="does not verify"):
        reviews.attest(digest, "spiffe://example.org/prod/user/mallory", sig, _leaf_der(officer), now=T0 + 60)
    a = reviews.attest(digest, me, sig, _leaf_der(officer), now=T0 + 60)
    assert a.reviewer == me and a.digest == digest and len(a.certificate) == 64
    assert [x.id for x in reviews.attestations(digest)] == [a.id]
    with pytest.raises(GovernanceError, match="already attested"):
        reviews.attest(digest, me, sig, _leaf_der(officer), now=T0 + 61)


def test_only_a_review_this_server_produced_and_kept_intact(
    signed: tuple[review.Reviews, dict[str, object], Path, Path], tmp_path: Path
) -> None:
    reviews, rv, officer, _ = signed
    key, me = review.load_reviewer(officer)
    made_up = "sha256:" + "ab" * 32
    with pytest.raises(GovernanceError, match="no review with that digest"):
        reviews.attest(made_up, me, review.sign(key, made_up, me), _leaf_der(officer), now=T0)
    digest = str(rv["digest"])
    with pytest.raises(GovernanceError, match="older than 7 days"):
        reviews.attest(digest, me, review.sign(key, digest, me), _leaf_der(officer), now=T0 + 8 * DAY)
    db = sqlite3.connect(tmp_path / "data" / "governance.db")
    db.execute("UPDATE gov_reviews SET body = replace(body, 'auditor', 'reader')")
    db.commit()
    db.close()
    with pytest.raises(GovernanceError, match="no review with that digest"):  # the kept body no longer hashes to it
        reviews.attest(digest, me, review.sign(key, digest, me), _leaf_der(officer), now=T0 + 60)
    with pytest.raises(GovernanceError, match="not a DER ECDSA signature"):
        reviews.attest(digest, me, "A" * 500, _leaf_der(officer), now=T0 + 60)


def test_load_reviewer_refuses_a_mismatched_folder(env: Env, tmp_path: Path) -> None:
    make_pki(env)
    a = issue_dir(env, env.work / "a", "user", "alice")
    b = issue_dir(env, env.work / "b", "user", "bob")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "cert.pem").write_bytes((a / "cert.pem").read_bytes())
    (mixed / "key.pem").write_bytes((b / "key.pem").read_bytes())
    with pytest.raises(GovernanceError, match=r"is not the key of its cert\.pem"):
        review.load_reviewer(mixed)
    with pytest.raises(GovernanceError, match=r"has no key\.pem"):
        review.load_reviewer(tmp_path)
