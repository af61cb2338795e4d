"""The console's Approvals page (server.console_approvals): what exactly will run, escaped;
the listing of one environment over a real approvals table; and, against the real server
with the console (tests.console_world), a key rotation that ``[governance] two_person``
made wait, approved in the page by two officers with TOTP codes, that then ran; an auditor
who sees the request but cannot decide it; a forged CSRF token, a wrong code, a deny with
its reason."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from modelseal.governance.approvals import Approval, Approvals
from modelseal.governance.model import Binding, Resource
from modelseal.server import console_approvals as ca
from modelseal.server.console_page import _ENV
from modelseal.server.gov_decide import SOURCE, WAITS_ON
from tests.conftest import Env
from tests.console_world import World, console_world
from tests.test_access_cli import USER
from tests.test_gov_two_person import BROKER, call

T0 = 1_800_000_000.0
ADMIN = f"{USER}/admin1"
KEY = Resource("Key", "llama-prod", {"env": "prod", "provider": "local"})


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Approvals]:
    store = Approvals.open(str(tmp_path / "governance.db"))
    yield store
    store.close()


def ask(db: Approvals, action: str = "key.rotate", params: dict[str, object] | None = None, **kw: object) -> Approval:
    p = {"name": "llama-prod", "version": None, SOURCE: "127.0.0.1", WAITS_ON: ["gov-two-person-configured"]}
    return db.request(action, kw.pop("res", KEY), params if params is not None else p, ADMIN, now=T0, **kw)  # type: ignore[arg-type]


# -- unit: what the page says ------------------------------------------------------------------


def test_what_runs_names_the_operation_and_its_target(db: Approvals) -> None:
    assert ca.what_runs(ask(db)) == "rotate broker key llama-prod: a new version wraps from then on"
    d = ask(db, "key.destroy", {"name": "old", "version": 3})
    assert ca.what_runs(d).startswith("destroy version 3 of broker key old: ")
    assert ca.what_runs(ask(db, "key.destroy", {"name": "old", "version": None})).startswith("destroy all versions")
    assert ca.what_runs(ask(db, "key.disable", {"name": "k", "version": 2})) == "disable version 2 of broker key k"
    glass = {"identity": ADMIN, "role": "publisher", "env": "prod", "for": 7200, "kind": "break-glass", "reason": ""}
    gov = Resource("Governance", "break-glass", {"env": "prod"})
    assert (
        ca.what_runs(ask(db, "access.break-glass", glass, res=gov))
        == f"break-glass: {ADMIN} becomes publisher in prod for 2.0 h"
    )
    assert (
        ca.what_runs(ask(db, "policy.activate", {"digest": "sha256:ab"}, res=gov))
        == "activate the policy version sha256:ab"
    )
    odd = ask(
        db, "hold.release", {"op": "place", "kind": "identity", "subject": "x\x1b[31mred", "reason": "r"}, res=gov
    )
    assert "\x1b" not in ca.what_runs(odd) and "hold the identity x" in ca.what_runs(odd)  # one printable line


def test_a_row_shows_the_parameters_pretty_and_the_servers_own_apart(db: Approvals) -> None:
    a = ask(db, params={"name": "<script>alert(1)</script>", "note": "é\x1b", SOURCE: "10.0.0.7", WAITS_ON: []})
    r = ca.row(a, T0 + 1)
    assert json.loads(r.params) == {"name": "<script>alert(1)</script>", "note": "é\x1b"}  # META left out
    assert "\\u001b" in r.params and "\\u00e9" in r.params and "\n  " in r.params  # ASCII only, indented
    assert (r.source, r.waits_on, r.needs, r.approvals) == ("10.0.0.7", "-", 2, [])
    assert r.resource == "Key:llama-prod (env=prod, provider=local)" and r.requester == ADMIN
    assert r.outcome == "pending: 0/2 approvals, waiting for another security officer"
    html = _ENV.get_template("approvals.html").render(
        title="Approvals", identity=USER, csrf="tok", expires=None, nav=[], here="/ui/approvals",
        available=True, pending=[replace(r, can_decide=True)], recent=[], done=None,
    )  # fmt: skip
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert f'data-approval="{a.id}"' in html and html.count('name="otp"') == 1
    assert '<input type="hidden" name="csrf" value="tok">' in html
    assert 'value="approve" class="primary">Approve</button>' in html and ">Deny</button>" in html
    readonly = html
    html = _ENV.get_template("approvals.html").render(
        title="Approvals", identity=USER, csrf="tok", expires=None, nav=[], here="/ui/approvals",
        available=True, pending=[r], recent=[], done=None,
    )  # fmt: skip
    assert 'name="otp"' not in html and "approval-readonly" in html and readonly != html
    long = ask(db, params={"blob": "x" * 10_000})
    assert len(ca.row(long, T0).params) < ca.MAX_PARAMS_SHOWN + 100 and "(cut:" in ca.row(long, T0).params


def test_outcomes_say_what_the_run_did(db: Approvals) -> None:
    a = ask(db, needs=1)
    assert ca.outcome(a, T0 + 86400 + 1) == "expired (0/1 approvals)"
    done, claimed = db.approve(a.id, f"{USER}/officer1", now=T0 + 5)
    assert claimed and ca.outcome(done, T0 + 6).startswith("approved; key.rotate is running")
    ran = db.finish(a.id, {"key": "llama-prod", "op": "rotate", "version": 2}, now=T0 + 7)
    assert ca.outcome(ran, T0 + 8) == "approved; key.rotate ran: version 2"
    b = ask(db, needs=1)
    db.approve(b.id, f"{USER}/officer1", now=T0 + 5)
    failed = db.finish(b.id, None, "broker key llama-prod has no version 9", now=T0 + 6)
    assert ca.outcome(failed, T0 + 7) == "approved; key.rotate failed: broker key llama-prod has no version 9"
    c = ask(db, "policy.activate", {"digest": "sha256:ab"}, needs=1)
    db.approve(c.id, f"{USER}/officer1", now=T0 + 5)
    assert (
        ca.outcome(db.finish(c.id, {"active": "sha256:ab"}), T0)
        == 'approved; policy.activate ran: {"active": "sha256:ab"}'
    )
    d = db.deny(ask(db).id, f"{USER}/officer2", "not during the freeze", now=T0 + 3)
    assert ca.outcome(d, T0 + 4) == f"denied by {USER}/officer2: not during the freeze"


def test_the_listing_is_of_one_environment_pending_apart_from_finished(
    db: Approvals, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = [ask(db) for _ in range(3)]
    dev = ask(db, res=Resource("Key", "k", {"env": "dev"}))
    short = db.request("key.rotate", KEY, {"name": "x"}, ADMIN, ttl=60, now=T0)
    db.deny(mine[2].id, f"{USER}/officer1", "no", now=T0 + 1)
    pending, recent = ca.listing(db, "prod", T0 + 120)
    assert {a.id for a in pending} == {mine[0].id, mine[1].id}  # dev's, the denied and the expired left out
    assert {a.id for a in recent} == {mine[2].id, short.id} and dev.id not in {a.id for a in pending + recent}
    assert [a.id for a in ca.listing(db, "dev", T0 + 120)[0]] == [dev.id]
    monkeypatch.setattr(ca, "PAGE_PENDING", 1)
    monkeypatch.setattr(ca, "RECENT", 1)
    pending, recent = ca.listing(db, "prod", T0 + 120)
    assert len(pending) == 1 and len(recent) == 1


# -- over the real server -------------------------------------------------------------------------

TWO_PERSON = BROKER + '[governance]\ntwo_person = ["key.rotate"]\n'


@pytest.fixture
def world(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    with console_world(env, monkeypatch, capsys, config=TWO_PERSON) as w:
        for o in ("officer1", "officer2"):
            w.enrol(o)
        w.gov.store.bind(Binding("", ADMIN, "key-admin", "prod", time.time() + 3600), by="test")
        w.enrol("admin1")
        yield w


def rotation(w: World) -> str:
    """admin1 asks to rotate llama-prod: queued, its approval id."""
    st, body = call(w, "admin1", "POST", "keys/llama-prod/rotate", {"otp": w.otp.code(ADMIN)})
    assert st == 202 and body["waits_on"] == ["gov-two-person-configured"], body
    aid: str = body["approval"]
    return aid


def versions(env: Env) -> list[int]:
    return [v.version for v in env.svc.info("local:test-kek").versions]


def test_two_officers_approve_a_pending_rotation_with_totp_and_it_runs(world: World, env: Env) -> None:
    w = world
    aid = rotation(w)
    b1 = w.sign_in("officer1")
    page = b1.get("/ui/approvals")
    assert page.status == 200 and f'<section class="card approval" data-approval="{aid}">' in page.body
    for shown in (
        "Will run: rotate broker key llama-prod",
        ADMIN,
        "gov-two-person-configured",
        "0/2",
        "Key:llama-prod",
    ):
        assert shown in page.body, shown
    assert page.body.count('name="otp"') == 1 and ">Approve</button>" in page.body and ">Deny</button>" in page.body
    done = b1.post(f"/ui/approvals/{aid}", {"verdict": "approve", "otp": w.otp.code(f"{USER}/officer1")})
    assert done.status == 303 and done.header("Location") == f"/ui/approvals?done={aid}", done.body[:300]
    after = b1.get(done.header("Location"))
    assert "pending: 1/2 approvals, waiting for another security officer" in after.body
    assert versions(env) == [1]  # one officer is not enough
    again = b1.post(f"/ui/approvals/{aid}", {"verdict": "approve", "otp": w.otp.code(f"{USER}/officer1")})
    assert again.status == 409 and "already approved" in again.body  # the same officer twice
    b2 = w.sign_in("officer2")
    done = b2.post(f"/ui/approvals/{aid}", {"verdict": "approve", "otp": w.otp.code(f"{USER}/officer2")})
    assert done.status == 303
    final = b2.get(done.header("Location"))
    assert "approved; key.rotate ran: version 2" in final.body and f'data-approval-done="{aid}"' in final.body
    assert f'data-approval="{aid}"' not in final.body and f'data-approval-finished="{aid}"' in final.body
    assert versions(env) == [1, 2]  # the rotation ran, once
    votes = [e["actor"] for e in w.audit_events("approval-approve")]  # the server's verified audit log
    assert votes == [f"{USER}/officer1", f"{USER}/officer2"]
    assert [e["actor"] for e in w.audit_events("rotate")] == [ADMIN]
    assert [e["result"] for e in w.audit_events("approval-run")] == [f"done:{aid}"]


def test_an_auditor_sees_the_request_but_cannot_decide_it(world: World) -> None:
    w = world
    aid = rotation(w)
    w.bind("alice", "auditor")
    b = w.sign_in("alice")
    page = b.get("/ui/approvals")
    assert page.status == 200 and f'data-approval="{aid}"' in page.body
    assert 'name="otp"' not in page.body and "approval-readonly" in page.body
    refused = b.post(f"/ui/approvals/{aid}", {"verdict": "approve", "otp": "123456"})
    assert refused.status == 403 and "approval.decide" in refused.body
    st, listed = call(w, "officer1", "GET", "approvals")
    assert st == 200 and [a["approvals"] for a in listed["approvals"] if a["id"] == aid] == [[]]


def test_a_forged_token_a_wrong_code_and_unknown_requests_are_refused(world: World) -> None:
    w = world
    aid = rotation(w)
    b = w.sign_in("officer1")
    forged = b.post(f"/ui/approvals/{aid}", {"verdict": "approve", "otp": "123456"}, csrf="forged")
    assert forged.status == 403 and "CSRF" in forged.body
    wrong = b.post(f"/ui/approvals/{aid}", {"verdict": "approve", "otp": "000000"})
    assert wrong.status == 403 and "wrong OTP code" in wrong.body and "000000" not in wrong.body
    none = b.post(f"/ui/approvals/{aid}", {"verdict": "approve"})
    assert none.status == 403 and "step-up MFA" in none.body
    assert b.post(f"/ui/approvals/{aid}", {"verdict": "maybe", "otp": "1"}).status == 400
    for unknown in ("0123456789abcdef", "nothex"):  # decided first, as the API does: no probe of ids
        assert b.post(f"/ui/approvals/{unknown}", {"verdict": "approve", "otp": "1"}).status == 403
    st, listed = call(w, "officer1", "GET", "approvals")
    assert st == 200 and [a["approvals"] for a in listed["approvals"] if a["id"] == aid] == [[]]  # nothing counted
    page = b.get("/ui/approvals?done=0123456789abcdef")
    assert page.status == 200 and "approval-done" not in page.body  # an unknown id shows nothing


def test_a_deny_records_its_reason_and_nothing_runs(world: World, env: Env) -> None:
    w = world
    aid = rotation(w)
    b = w.sign_in("officer2")
    reason = "not during the <freeze>"
    done = b.post(f"/ui/approvals/{aid}", {"verdict": "deny", "otp": w.otp.code(f"{USER}/officer2"), "reason": reason})
    assert done.status == 303
    page = b.get(done.header("Location"))
    assert f"denied by {USER}/officer2: not during the &lt;freeze&gt;" in page.body
    st, listed = call(w, "officer1", "GET", "approvals?all=1")
    (a,) = [x for x in listed["approvals"] if x["id"] == aid]
    assert st == 200 and a["state"] == "denied" and a["reason"] == reason and versions(env) == [1]
