"""The console's Policies page (issue 16, helper E): the active version and who pinned it,
the history, the exceptions with their expiry flags, and the diff of two versions, over a
real PolicyStore on SQLite; a tampered version is refused; policy text reaches the page
escaped, never as markup."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from modelseal.governance.cedar import default_policy
from modelseal.governance.exceptions import utc_text
from modelseal.governance.versions import PolicyStore, digest_of
from modelseal.server import authz
from modelseal.server.console_page import _ENV
from modelseal.server.console_policies import (
    SOON_DAYS,
    diff,
    diff_versions,
    exception_rows,
    overview,
    version_text,
)
from tests.conftest import Env
from tests.console_world import World, console_world
from tests.test_access_cli import USER

NOW = 1_800_000_000.0
DAY = 86400.0
ALICE = "spiffe://example.org/prod/user/alice"
BOB = "spiffe://example.org/prod/user/bob"
CAROL = "spiffe://example.org/prod/user/carol"


def exception(exc_id: str, expires: float, justification: str = "re-sealed under transit next quarter") -> str:
    return f"""
@id("{exc_id.lower()}-policy")
@exception("{exc_id}")
@waives("std-prod-kms")
@justification("{justification}")
@owner("ml-platform@example.org")
@approved_by("ciso@example.org")
@expires("{utc_text(expires)}")
permit (principal, action == Action::"artifact.pull", resource is Artifact)
when {{ resource.artifact_id == "{"a" * 64}" }};
"""


V1 = default_policy().text + exception("EXC-OLD", NOW - 2 * DAY)
V2 = V1 + exception("EXC-SOON", NOW + 3 * DAY) + exception("EXC-LATER", NOW + 60 * DAY, "<b>bold</b> & more")


@pytest.fixture
def store(tmp_path: Path) -> PolicyStore:
    return PolicyStore.open(tmp_path / "gov" / "governance.db")


def two_versions(store: PolicyStore) -> tuple[str, str]:
    v1 = store.propose(V1, ALICE, "first <i>note</i>", now=NOW - 10 * DAY)
    v2 = store.propose(V2, BOB, "two more exceptions", now=NOW - 5 * DAY)
    store.activate(v1.digest, ALICE, [BOB, CAROL], now=NOW - 9 * DAY)
    store.activate(v2.digest, BOB, [CAROL, ALICE], now=NOW - 4 * DAY)
    return v1.digest, v2.digest


def test_before_any_activation_the_default_is_in_force(store: PolicyStore) -> None:
    view = overview(store, NOW)
    assert view.active.source == "default" and view.active.digest == default_policy().digest
    assert view.active.activation is None and view.active.proposer == ""
    assert view.versions == [] and view.activations == [] and view.exceptions == []
    assert "std-prod-kms" in view.active.standards and view.active.policies == len(default_policy().ids)


def test_the_active_version_its_history_and_who_pinned_it(store: PolicyStore) -> None:
    d1, d2 = two_versions(store)
    view = overview(store, NOW)
    a = view.active
    assert a.source == "activated" and a.digest == d2 == digest_of(V2)
    assert a.proposer == BOB and a.proposed == utc_text(NOW - 5 * DAY) and a.note == "two more exceptions"
    assert a.activation is not None and a.activation.seq == 2 and a.activation.requested_by == BOB
    assert a.activation.approvals == (ALICE, CAROL)  # kept sorted
    assert a.activation.activated == utc_text(NOW - 4 * DAY)
    assert [(v.digest, v.active, v.proposer) for v in view.versions] == [(d2, True, BOB), (d1, False, ALICE)]
    assert [(x.seq, x.digest) for x in view.activations] == [(2, d2), (1, d1)]
    assert a.text[0] == V2.splitlines()[0] and len(a.text) == len(V2.splitlines())


def test_exceptions_are_flagged_by_their_expiry(store: PolicyStore) -> None:
    two_versions(store)
    rows = overview(store, NOW).exceptions
    assert [(e.id, e.status) for e in rows] == [("EXC-OLD", "expired"), ("EXC-SOON", "soon"), ("EXC-LATER", "live")]
    old, soon, later = rows
    assert old.flag == "expired" and soon.flag == f"expires in < {SOON_DAYS} days" and later.flag == ""
    assert soon.days_left == 3 and later.days_left == 60 and later.expires == utc_text(NOW + 60 * DAY)
    assert later.waives == "std-prod-kms" and later.owner == "ml-platform@example.org"
    # the same set a week on: SOON has expired too, LATER is not yet within a week
    assert [e.status for e in exception_rows(store.active(), NOW + 8 * DAY)] == ["expired", "expired", "live"]
    assert [e.status for e in exception_rows(store.active(), NOW + 54 * DAY)][-1] == "soon"


def test_diff_of_two_versions(store: PolicyStore) -> None:
    d1, d2 = two_versions(store)
    d = diff_versions(store, d1, "active")
    assert (d.left, d.right) == (d1, d2) and not d.truncated
    kinds = [k for k, _ in d.lines]
    assert kinds[:3] == ["file", "file", "hunk"] and d.lines[0][1] == f"--- {d1}" and d.lines[1][1] == f"+++ {d2}"
    added = [line for k, line in d.lines if k == "add"]
    assert '+@exception("EXC-SOON")' in added and '+@exception("EXC-LATER")' in added
    assert d.removed == 0 and d.added == len(added) == len(V2.splitlines()) - len(V1.splitlines())
    back = diff_versions(store, "active", d1)
    assert back.added == 0 and back.removed == d.added
    assert diff_versions(store, d2, "active").lines == []
    from_default = diff_versions(store, "default", d1)
    assert from_default.left == default_policy().digest and from_default.added == len(V1.splitlines()) - len(
        default_policy().text.splitlines()
    )
    short = diff((d1, V1), (d2, V2), limit=5)
    assert len(short.lines) == 5 and short.truncated and short.added == d.added


def test_bad_unknown_and_tampered_versions_are_refused(store: PolicyStore, tmp_path: Path) -> None:
    with pytest.raises(authz.Refusal) as bad:
        version_text(store, "sha256:xyz")
    assert bad.value.status_code == 400
    with pytest.raises(authz.Refusal) as unknown:
        version_text(store, "sha256:" + "0" * 64)
    assert unknown.value.status_code == 404
    d1, d2 = two_versions(store)
    db = sqlite3.connect(tmp_path / "gov" / "governance.db")
    db.execute("UPDATE gov_policy_versions SET body = body || '// edited' WHERE digest = ?", (d2,))
    db.commit()
    db.close()
    with pytest.raises(authz.Refusal) as tampered:
        overview(store, NOW)
    assert tampered.value.status_code == 503 and "tampered" in tampered.value.reason_line
    with pytest.raises(authz.Refusal) as again:
        version_text(store, d2)
    assert again.value.status_code == 503
    assert version_text(store, d1)[1] == V1  # an untouched version still reads


def test_policy_text_and_notes_reach_the_page_escaped(store: PolicyStore) -> None:
    hostile = default_policy().text + '\n// <script src="/x.js"></script> \x1b[31m\n'
    d0 = store.propose(hostile, "spiffe://example.org/prod/user/<img src=x>", "note <script>alert(1)</script>").digest
    two_versions(store)
    view = overview(store, NOW)
    page = _ENV.get_template("policies.html").render(
        title="Policies",
        identity=ALICE,
        csrf="t",
        expires=0,
        nav=[],
        here="/ui/policies",
        configured=True,
        view=view,
        soon=SOON_DAYS,
    )
    assert "<script>" not in page and "<img src=x>" not in page and "<b>bold</b>" not in page
    assert "note &lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page
    assert f'data-digest="{d0}"' in page and page.count('data-status="expired"') == 1
    assert "expires in &lt; 7 days" in page and "approved by " + ALICE + ", " + CAROL in page
    d = diff_versions(store, "default", d0)
    html = _ENV.get_template("policy_diff.html").render(
        title="Policy diff", identity=ALICE, csrf="t", expires=0, nav=[], here="/ui/policies/diff", diff=d, limit=10
    )
    assert "<script" not in html and "&lt;script src=&#34;/x.js&#34;&gt;&lt;/script&gt;" in html
    assert "\x1b" not in html and "\\x1b[31m" in html
    assert 'data-kind="add"' in html and 'class="add"' in html


def test_a_server_without_a_policy_store_says_so() -> None:
    page = _ENV.get_template("policies.html").render(
        title="Policies",
        identity=ALICE,
        csrf="t",
        expires=0,
        nav=[],
        here="/ui/policies",
        configured=False,
        view=None,
        soon=SOON_DAYS,
    )
    assert 'data-testid="policies-not-configured"' in page and 'data-testid="policy-active"' not in page


# -- through the real server (tests.console_world) ------------------------------------------


@pytest.fixture
def world(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    with console_world(env, monkeypatch, capsys) as w:
        yield w


def test_the_pages_through_the_server(world: World) -> None:
    officer = world.sign_in("officer1")
    first = officer.get("/ui/policies")
    assert first.status == 200 and 'data-source="default"' in first.body
    assert default_policy().digest in first.body and 'data-testid="exceptions-none"' in first.body
    now = world.clock.time()
    store = world.gov.policies
    v1 = store.propose(default_policy().text + exception("EXC-OLD", now - DAY), f"{USER}/officer2", "v1", now=now)
    v2 = store.propose(v1.text + exception("EXC-SOON", now + 2 * DAY), f"{USER}/officer3", "v2 <em>", now=now)
    store.activate(v2.digest, f"{USER}/officer3", [f"{USER}/officer1", f"{USER}/officer4"], now=now)
    page = officer.get("/ui/policies")
    assert page.status == 200 and f'data-digest="{v2.digest}" data-source="activated"' in page.body
    assert (
        'data-id="EXC-OLD" data-status="expired"' in page.body and 'data-id="EXC-SOON" data-status="soon"' in page.body
    )
    assert f"requested by {USER}/officer3; approved by {USER}/officer1, {USER}/officer4" in page.body
    assert "v2 &lt;em&gt;" in page.body and f"/ui/policies/diff?from={quote(v1.digest, safe='')}" in page.body
    d = officer.get(f"/ui/policies/diff?from={v1.digest}")
    assert d.status == 200 and f'data-testid="diff-to">{v2.digest}<' in d.body
    assert '<span class="add" data-testid="diff-line" data-kind="add">+@exception(&#34;EXC-SOON&#34;)</span>' in d.body
    assert officer.get("/ui/policies/diff?from=sha256:nothex").status == 400
    assert officer.get(f"/ui/policies/diff?from=sha256:{'0' * 64}").status == 404
    assert officer.get(f"/ui/policies/diff?from={v2.digest}&to=active").body.count('data-testid="diff-same"') == 1


def test_an_auditor_reads_and_an_unbound_user_is_refused(world: World) -> None:
    world.enrol("officer1")
    world.bind("alice", "auditor")
    alice = world.sign_in("alice")
    page = alice.get("/ui/policies")
    assert page.status == 200 and 'data-testid="policy-active"' in page.body
    assert page.body.count('method="post"') == 1  # sign-out only: the page is read-only
    nobody = world.sign_in("mallory")
    refused = nobody.get("/ui/policies")
    assert refused.status == 403 and 'data-testid="policy-active"' not in refused.body
    assert nobody.get("/ui/policies/diff?from=default").status == 403
