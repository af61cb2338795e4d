"""The console's Approvals page (docs/console.md): the two-person requests of this server's
environment waiting for approval, each with what exactly will run (action, resource,
parameters, requester, when it was asked and expires, the approvals so far, the forbids it
waits on), an Approve / Deny form with a TOTP code (and a deny's reason), and the requests
finished lately with their outcome.

Decided as the API decides (``server.gov_api``): the page asks ``approval.list`` on
``Governance:approvals``; the form is shown where ``approval.decide`` on the request's
``Approval`` is allowed, and its POST goes through ``server.gov_decide.decide_approval``, the
very core of ``POST /modelseal/v1/approvals/ID/approve|deny``: the code is verified bound to
the request's digest and this verdict, the decision is made again (an auditor's POST is a
403 whatever the page showed), and the approval that completes a request runs its executor
here, once. After a POST the page shows that request as the store has it now (``?done=ID``:
an id, never a message a link could forge).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from modelseal.errors import GovernanceError
from modelseal.governance.approvals import Approval, Approvals, check_id
from modelseal.server import authz, gov_decide
from modelseal.server.console_page import PREFIX, allowed, cut, form, nav, render, require, resource, run
from modelseal.server.identity import IDENTITY

PAGE_PENDING = 50  # pending requests shown (oldest first)
RECENT = 20  # finished requests shown (newest first)
SCAN = 200  # requests read to find them
MAX_PARAMS_SHOWN = 4000  # characters of a request's parameters (pretty JSON)
_TEXT = 200


def when(t: float | None) -> str:
    """``t`` (POSIX seconds) as UTC, ``-`` for none."""
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _name(params: dict[str, Any], key: str) -> str:
    return cut(params.get(key, "?"), 120)


def what_runs(a: Approval) -> str:
    """One line saying what the request's executor will do, from its parameters."""
    p, act = dict(a.params), a.action
    version = p.get("version")
    if act == "key.destroy":
        which = "all versions" if version is None else f"version {cut(version, 12)}"
        return f"destroy {which} of broker key {_name(p, 'name')}: what is sealed to them can no longer be opened"
    if act == "key.rotate":
        return f"rotate broker key {_name(p, 'name')}: a new version wraps from then on"
    if act in ("key.disable", "key.enable"):
        return f"{act[4:]} version {cut(version, 12)} of broker key {_name(p, 'name')}"
    if act == "policy.activate":
        return f"activate the policy version {_name(p, 'digest')}"
    if act in ("access.bind", "access.grant", "access.break-glass"):
        who = cut(a.requester) if act == "access.break-glass" else _name(p, "identity")
        span = p.get("for")
        hours = span / 3600 if isinstance(span, int) else 0.0
        return f"{act[7:]}: {who} becomes {_name(p, 'role')} in {_name(p, 'env')} for {hours:.1f} h"
    if act == "access.unbind":
        return f"remove the security-officer binding {_name(p, 'id')}"
    if act == "hold.release" and p.get("op") == "place":
        return f"hold the {_name(p, 'kind')} {_name(p, 'subject')} pending review"
    if act == "hold.release":
        return f"release hold {cut(a.resource.id, 40)}"
    return f"{cut(act, 60)} with the parameters below"


def outcome(a: Approval, now: float) -> str:
    """One line: where the request stands, and what its run did."""
    state = a.state_at(now)
    votes = f"{len(a.approvers)}/{a.needs} approvals"
    if state == "pending":
        return f"pending: {votes}, waiting for another security officer"
    if state == "denied":
        why = f": {cut(a.reason)}" if a.reason else ""
        return f"denied by {cut(a.decided_by or '?')}{why}"
    if state == "done":
        r = dict(a.result or {})
        if "version" in r:
            return f"approved; {a.action} ran: version {cut(r['version'], 12)}"
        return f"approved; {a.action} ran: {cut(json.dumps(r, sort_keys=True), 300)}"
    if state == "failed":
        return f"approved; {a.action} failed: {cut(a.error or '?', 300)}"
    if state == "running":
        return f"approved; {a.action} is running (or its runner died: it is never run twice)"
    return f"{state} ({votes})"


@dataclass
class Row:
    """One request as the page shows it (every text cut to one printable line)."""

    id: str
    action: str
    resource: str
    what: str
    params: str
    requester: str
    created: str
    expires: str
    approvals: list[str]
    needs: int
    digest: str
    waits_on: str
    source: str
    outcome: str
    can_decide: bool = False


def row(a: Approval, now: float) -> Row:
    """``a`` for the template: its parameters as pretty JSON (``\\uXXXX`` for anything not
    printable ASCII), the server's own (``gov_decide.META``) shown apart."""
    shown = {k: v for k, v in a.params.items() if k not in gov_decide.META}
    text = json.dumps(shown, indent=2, sort_keys=True, ensure_ascii=True)
    if len(text) > MAX_PARAMS_SHOWN:
        text = text[:MAX_PARAMS_SHOWN] + "\n... (cut: modelseal approvals list --json shows all)"
    waits = a.params.get(gov_decide.WAITS_ON)
    attrs = ", ".join(f"{cut(k, 40)}={cut(v, 80)}" for k, v in sorted(a.resource.attrs.items()))
    return Row(
        id=a.id,
        action=cut(a.action, 60),
        resource=f"{cut(a.resource.type, 40)}:{cut(a.resource.id)}" + (f" ({attrs})" if attrs else ""),
        what=what_runs(a),
        params=text,
        requester=cut(a.requester),
        created=when(a.created),
        expires=when(a.expires),
        approvals=[cut(o) for o in a.approvers],
        needs=a.needs,
        digest=cut(a.digest, 80),
        waits_on=", ".join(cut(w, 60) for w in waits) if isinstance(waits, list) and waits else "-",
        source=cut(a.params.get(gov_decide.SOURCE) or "-", 60),
        outcome=outcome(a, now),
    )


def listing(store: Approvals, env: str, now: float) -> tuple[list[Approval], list[Approval]]:
    """The pending requests of ``env`` (oldest first, at most ``PAGE_PENDING``) and its
    finished ones (newest first, at most ``RECENT``, among the last ``SCAN``)."""
    pending = [a for a in store.pending(now) if a.resource.attrs.get("env") == env][:PAGE_PENDING]
    recent = [a for a in store.recent(SCAN) if a.resource.attrs.get("env") == env and a.state_at(now) != "pending"]
    return pending, recent[:RECENT]


def _store(request: web.Request) -> Approvals | None:
    return request.app.get(gov_decide.APPROVALS)


async def decidable(request: web.Request, a: Approval) -> bool:
    """Whether the identity may decide ``a`` once its POST brings a fresh code
    (``console_page.allowed`` with ``step_up``: the decision of ``approval.decide`` on the
    request's resource as if the code were there; the POST is decided again with it)."""
    return await allowed(request, "approval.decide", gov_decide.decided_on(a), step_up=True)


async def page(request: web.Request) -> web.Response:
    """``GET /ui/approvals[?done=ID]``: pending and finished requests, forms where allowed."""
    await require(request, "approval.list", resource(request, "Governance", "approvals"))
    store = _store(request)
    if store is None:
        return render(request, "approvals.html", title="Approvals", available=False, pending=[], recent=[], done=None)
    now = time.time()
    pending, recent = await run(request, listing, store, request[IDENTITY].env, now)
    rows: list[Row] = []
    asked: dict[tuple[str, str], bool] = {}  # one decision per (action, requester): each is audited, a deny too
    for a in pending:
        r, pair = row(a, now), (a.action, a.requester)
        if pair not in asked:
            asked[pair] = await decidable(request, a)
        r.can_decide = asked[pair]
        rows.append(r)
    done = None
    wanted = request.query.get("done", "")
    if wanted:
        try:
            got = await run(request, store.get, check_id(wanted))
        except GovernanceError:
            got = None
        if got is not None and got.resource.attrs.get("env") == request[IDENTITY].env:
            done = row(got, now)
    return render(
        request,
        "approvals.html",
        title="Approvals",
        available=True,
        pending=rows,
        recent=[row(a, now) for a in recent],
        done=done,
    )


async def decide(request: web.Request) -> web.Response:
    """``POST /ui/approvals/ID`` (``verdict``, ``otp``, ``reason``): the API's decision core."""
    fields = await form(request)
    if _store(request) is None:
        raise authz.Refusal(503, "UNAVAILABLE", "this server has no approvals")
    verdict, code = fields.get("verdict", ""), fields.get("otp", "").strip()
    if verdict not in gov_decide.VERDICTS:
        raise authz.Refusal(400, "INVALID", "choose Approve or Deny")
    reason = " ".join(fields.get("reason", "").split()) if verdict == "deny" else ""
    try:
        a = await gov_decide.decide_approval(request, request.match_info["id"], verdict, code or None, reason)
    except gov_decide.NotFound as e:
        raise authz.Refusal(404, "NOT_FOUND", str(e)) from None
    raise web.HTTPSeeOther(f"{PREFIX}/approvals?done={a.id}")


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/approvals`` and its place in the navigation."""
    nav(f"{PREFIX}/approvals", "Approvals")
    app.router.add_get(f"{PREFIX}/approvals", page)
    app.router.add_post(PREFIX + "/approvals/{id}", decide)


__all__ = ["Row", "add_routes", "listing", "outcome", "row", "what_runs"]
