"""The console's Access review page (server.console_review): the review's entries and flags
over a real governance database, escaped; the latest attestations, signed for real; and,
against the real server with the console (tests.console_world), the page an officer and an
auditor see, a review kept so that the CLI can attest its digest, and a reader refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from modelseal.governance import review
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore
from modelseal.server import console_review as cr
from modelseal.server.console_page import _ENV
from tests.conftest import Env
from tests.console_world import World, console_world
from tests.push_pull_helpers import issue_dir, make_pki
from tests.test_access_cli import USER

NOW = time.time()
DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GovStore]:
    s = GovStore.open(str(tmp_path / "governance.db"))
    yield s
    s.close()


def test_entries_flags_and_the_flagged_filter(store: GovStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = store.bind(Binding("", f"{USER}/ann", "auditor", "prod", NOW + 30 * DAY), "officer", NOW - DAY)
    stale = store.bind(
        Binding("", f"{USER}/bob", "reader", "prod", NOW + 10 * DAY, reason="<b>old</b> stale"), "officer", NOW - 40 * DAY
    )  # fmt: skip
    store.touch([fresh.id], NOW - 3600)
    rv = review.build(store.bindings(True), now=NOW)
    rows, matched = cr.entries(rv)
    assert matched == 2 and [r.id for r in rows] == [fresh.id, stale.id]
    ann, bob = rows
    assert ann.flags == [] and ann.last_used != "never" and bob.flags == ["unused"] and bob.last_used == "never"
    assert bob.reason == "<b>old</b> stale"  # escaped by the template
    odd, _ = cr.entries({"entries": [{"identity": "spiffe://x/\x1b[31m\nred", "flags": ["unused"], "last_used": "x"}]})
    assert odd[0].identity == "spiffe://x/\\x1b[31m\\x0ared" and odd[0].last_used == "never"  # one printable line
    flagged, n = cr.entries(rv, flagged=True)
    assert n == 1 and [r.id for r in flagged] == [stale.id]
    assert cr.summary(rv) == [("expired", 0), ("unused", 1), ("sod-conflict", 0)]  # held: only with the holds
    monkeypatch.setattr(cr, "MAX_ROWS", 1)
    rows, matched = cr.entries(rv)
    assert len(rows) == 1 and matched == 2
    html = _ENV.get_template("review.html").render(
        title="Access review", identity=USER, csrf="t", expires=None, nav=[], here="/ui/access", available=True,
        rows=[*rows, bob], matched=3, flagged=False, summary=cr.summary(rv), digest=rv["digest"], generated="now",
        attestations=[], can_attest=False, max_rows=2,
    )  # fmt: skip
    assert "<b>old" not in html and "&lt;b&gt;old&lt;/b&gt;" in html and f'data-binding="{stale.id}"' in html
    assert rv["digest"] in html and "review-no-attest" in html and "modelseal access review --attest" not in html
    assert "3 bindings match; the first 2 are shown" in html


def test_the_latest_attestations_newest_first(env: Env, tmp_path: Path, store: GovStore) -> None:
    make_pki(env)
    folder = issue_dir(env, tmp_path / "tls-ann", "user", "ann")
    key, me = review.load_reviewer(folder)
    der = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes()).public_bytes(serialization.Encoding.DER)
    reviews = review.Reviews.open(store.target)
    try:
        digests = []
        for i in range(3):
            rv = review.build(store.bindings(True), now=NOW + i)
            reviews.keep(rv, me)
            reviews.attest(rv["digest"], me, review.sign(key, rv["digest"], me), der, now=NOW + i)
            digests.append(rv["digest"])
        shown = cr.latest_attestations(reviews, n=2)
    finally:
        reviews.close()
    assert [a["digest"] for a in shown] == [digests[2], digests[1]]
    assert shown[0]["reviewer"] == me and len(shown[0]["certificate"]) == 64


# -- over the real server ---------------------------------------------------------------------


@pytest.fixture
def world(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    with console_world(env, monkeypatch, capsys) as w:
        w.enrol("officer1")
        yield w


def test_an_officer_sees_every_binding_and_how_to_attest_the_digest_shown(world: World) -> None:
    w = world
    w.bind("ann", "auditor")
    b = w.sign_in("officer1")
    page = b.get("/ui/access")
    assert page.status == 200
    for who in ("officer1", "officer2", "officer3", "officer4", "ann"):
        assert f"<code>{USER}/{who}</code>" in page.body, who
    digest = page.body.split('data-testid="review-digest">', 1)[1].split("<", 1)[0]
    assert digest.startswith("sha256:") and len(digest) == 71
    assert 'data-testid="review-attest"' in page.body and "modelseal access review --attest" in page.body
    assert "review-no-attestations" in page.body
    # the review shown was kept: its digest can be attested (as the CLI does, signing with the folder's key)
    key, me = review.load_reviewer(w.folder("officer1"))
    with w.api("officer1") as api:
        done = api.call("POST", "access/attestations", {"digest": digest, "signature": review.sign(key, digest, me)})
    assert done["digest"] == digest and done["reviewer"] == me
    again = b.get("/ui/access?flagged=1")
    assert again.status == 200 and f"<code>{digest}</code>" in again.body and "review-no-attestations" not in again.body
    assert "No binding is flagged" in again.body  # every binding here is fresh and in use or new


def test_an_auditor_reads_the_review_without_attesting_and_a_reader_is_refused(world: World) -> None:
    w = world
    w.bind("ann", "auditor")
    w.bind("rick", "reader")
    page = w.sign_in("ann").get("/ui/access")
    assert page.status == 200 and f"<code>{USER}/rick</code>" in page.body
    assert "review-no-attest" in page.body and "review-attest" not in page.body.replace("review-no-attest", "")
    refused = w.sign_in("rick").get("/ui/access")
    assert refused.status == 403 and "access.review" in refused.body
