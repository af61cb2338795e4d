"""The console's Policies page (docs/console.md): the policy set in force on this server (its
digest, who proposed it and when, the activation that pinned it and who approved it, or the
shipped default before any activation), every proposed version and every activation, the
exceptions to the encryption standards the active set carries with their expiry (flagged
"expired" and "expires in < 7 days"), and a unified diff of any two versions
(``/ui/policies/diff?from=V&to=W``, ``W`` the active one unless given).

Read-only, decided exactly as ``server.policy_api`` decides its reads: ``policy.read`` on
``Governance:policy`` of the caller's environment (roles security-officer and auditor).
Read from the server's ``governance.versions.PolicyStore`` in the console's pool; every
version is re-hashed against its digest when its text is read, and a pinned version that
fails its digest is a 503 as on the API. The diff is ``difflib.unified_diff`` of the two
texts, handed to the template as (class, line) pairs, each line made printable
(``keys.service.printable``) and cut; the template escapes it, no markup comes from a
policy. Bounded: at most ``MAX_DIFF_LINES`` lines of diff are shown.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field

from aiohttp import web

from modelseal.errors import GovernanceError
from modelseal.evidence.model import utc as when  # YYYY-MM-DDTHH:MM:SSZ, "" for none
from modelseal.governance.cedar import PolicySet, default_policy
from modelseal.governance.versions import DEFAULT, Activation, PolicyStore, UnknownVersion, check_digest
from modelseal.server import authz
from modelseal.server.console_page import PREFIX, cut, deps, nav, render, require, resource, run

SOON_DAYS = 7  # an exception expiring sooner than this is flagged
DAY = 86400.0
MAX_DIFF_LINES = 4000
MAX_LINE = 400  # characters of one shown policy or diff line
_TEXT = 200


@dataclass(frozen=True)
class ExceptionRow:
    """One exception to the encryption standards; ``status``: live, soon or expired."""

    id: str
    policy: str
    waives: str
    owner: str
    approved_by: str
    justification: str
    expires: str
    status: str
    days_left: int

    @property
    def flag(self) -> str:
        return {"expired": "expired", "soon": f"expires in < {SOON_DAYS} days"}.get(self.status, "")


@dataclass(frozen=True)
class VersionRow:
    digest: str
    proposer: str
    proposed: str
    note: str
    active: bool


@dataclass(frozen=True)
class ActivationRow:
    seq: int
    digest: str
    requested_by: str
    approvals: tuple[str, ...]
    activated: str


@dataclass(frozen=True)
class ActiveRow:
    """The set in force: ``source`` is ``default`` (the shipped set, no activation yet) or
    ``activated``; ``proposer``/``proposed``/``note`` are its version's (empty for the default)."""

    digest: str
    source: str
    proposer: str
    proposed: str
    note: str
    activation: ActivationRow | None
    policies: int
    standards: tuple[str, ...]
    text: list[str]


@dataclass
class Overview:
    active: ActiveRow
    versions: list[VersionRow] = field(default_factory=list)
    activations: list[ActivationRow] = field(default_factory=list)
    exceptions: list[ExceptionRow] = field(default_factory=list)


def exception_rows(ps: PolicySet, now: float) -> list[ExceptionRow]:
    """The exceptions of ``ps``, soonest expiry first, each flagged against ``now``."""
    out = []
    for e in sorted(ps.exceptions, key=lambda x: (x.expires, x.id)):
        left = e.expires - now
        status = "expired" if e.expired(now) else "soon" if left < SOON_DAYS * DAY else "live"
        out.append(
            ExceptionRow(
                cut(e.id),
                cut(e.policy_id),
                cut(", ".join(sorted(e.waives))),
                cut(e.owner, 400),
                cut(e.approved_by, 400),
                cut(e.justification, 400),
                e.expires_text,
                status,
                int(left // DAY),
            )
        )
    return out


def _activation(a: Activation) -> ActivationRow:
    return ActivationRow(
        a.seq, cut(a.digest, 80), cut(a.requested_by), tuple(cut(x) for x in a.approvals), when(a.activated)
    )


def text_lines(text: str) -> list[str]:
    """A policy text as printable lines of at most ``MAX_LINE`` characters."""
    return [cut(line, MAX_LINE) for line in text.splitlines()]


def _tampered(e: GovernanceError) -> authz.Refusal:
    return authz.Refusal(503, "UNAVAILABLE", cut(e, 300))


def overview(store: PolicyStore, now: float) -> Overview:
    """The active set, the history of versions and activations, the active set's exceptions."""
    try:
        ps = store.active()
    except GovernanceError as e:
        raise _tampered(e) from None
    acts = store.activations()  # read once; the one in force is the newest naming the active set's digest
    a = next((x for x in reversed(acts) if x.digest == ps.digest), None)
    versions = [
        VersionRow(cut(v.digest, 80), cut(v.proposer), when(v.proposed), cut(v.note, 400), v.active)
        for v in store.versions()
    ]
    mine = next((v for v in versions if a is not None and v.digest == a.digest), None)
    active = ActiveRow(
        ps.digest,
        DEFAULT if a is None else "activated",
        "" if mine is None else mine.proposer,
        "" if mine is None else mine.proposed,
        "" if mine is None else mine.note,
        None if a is None else _activation(a),
        len(ps.ids),
        tuple(cut(s) for s in sorted(ps.standards)),
        text_lines(ps.text),
    )
    return Overview(
        active,
        list(reversed(versions)),  # newest first
        [_activation(x) for x in reversed(acts)],
        exception_rows(ps, now),
    )


def version_text(store: PolicyStore, name: str) -> tuple[str, str]:
    """``(digest, text)`` of ``name``: a version's digest, ``default`` (the shipped set) or
    ``active``; a refusal (400, 404, 503) for anything else."""
    if name == DEFAULT:
        ps = default_policy()
        return ps.digest, ps.text
    if name == "active":
        try:
            ps = store.active()
        except GovernanceError as e:
            raise _tampered(e) from None
        return ps.digest, ps.text
    try:
        digest = check_digest(name)
    except GovernanceError as e:
        raise authz.Refusal(400, "INVALID", str(e)) from None
    try:
        return digest, store.get(digest).text
    except UnknownVersion as e:
        raise authz.Refusal(404, "NOT_FOUND", cut(e, 300)) from None
    except GovernanceError as e:
        raise _tampered(e) from None


@dataclass
class Diff:
    """A unified diff as ``(kind, line)``: kind is file, hunk, add, del or same."""

    left: str
    right: str
    lines: list[tuple[str, str]]
    truncated: bool
    added: int
    removed: int


def _kind(line: str) -> str:
    if line.startswith(("--- ", "+++ ")):
        return "file"
    if line.startswith("@@"):
        return "hunk"
    return {"+": "add", "-": "del"}.get(line[:1], "same")


def diff(left: tuple[str, str], right: tuple[str, str], limit: int = MAX_DIFF_LINES) -> Diff:
    """The unified diff of two ``(digest, text)`` versions, at most ``limit`` lines."""
    out: list[tuple[str, str]] = []
    added = removed = 0
    truncated = False
    raw = difflib.unified_diff(
        left[1].splitlines(), right[1].splitlines(), fromfile=left[0], tofile=right[0], lineterm="", n=3
    )
    for line in raw:
        kind = _kind(line)
        added += kind == "add"
        removed += kind == "del"
        if len(out) < limit:
            out.append((kind, cut(line, MAX_LINE)))
        else:
            truncated = True
    return Diff(left[0], right[0], out, truncated, added, removed)


def diff_versions(store: PolicyStore, frm: str, to: str) -> Diff:
    """The diff from version ``frm`` to version ``to`` (``version_text`` names)."""
    return diff(version_text(store, frm), version_text(store, to))


async def _allow(request: web.Request) -> None:
    await require(request, "policy.read", resource(request, "Governance", "policy"))


def _store(request: web.Request) -> PolicyStore | None:
    store = deps(request).policies
    return store if isinstance(store, PolicyStore) else None


async def policies_page(request: web.Request) -> web.Response:
    """``GET /ui/policies``: the active version, the history, the exceptions."""
    await _allow(request)
    store = _store(request)
    if store is None:
        return render(request, "policies.html", title="Policies", configured=False, view=None, soon=SOON_DAYS)
    view = await run(request, overview, store, time.time())
    return render(request, "policies.html", title="Policies", configured=True, view=view, soon=SOON_DAYS)


def _name(request: web.Request, key: str, default: str) -> str:
    value = request.query.get(key, "") or default
    if len(value) > 80:
        raise authz.Refusal(400, "INVALID", f"{key} names a version by sha256:<64 hex digits>, default or active")
    return value


async def diff_page(request: web.Request) -> web.Response:
    """``GET /ui/policies/diff?from=V[&to=W]``: what changes from ``V`` to ``W`` (default: active)."""
    await _allow(request)
    store = _store(request)
    if store is None:
        raise authz.Refusal(503, "UNAVAILABLE", "this server has no policy store: not available on this server")
    frm, to = _name(request, "from", DEFAULT), _name(request, "to", "active")
    d = await run(request, diff_versions, store, frm, to)
    return render(request, "policy_diff.html", title="Policy diff", diff=d, limit=MAX_DIFF_LINES)


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/policies`` and its place in the navigation."""
    nav(f"{PREFIX}/policies", "Policies")
    app.router.add_get(f"{PREFIX}/policies", policies_page)
    app.router.add_get(f"{PREFIX}/policies/diff", diff_page)


__all__ = [
    "ActiveRow",
    "Diff",
    "ExceptionRow",
    "Overview",
    "add_routes",
    "diff",
    "diff_versions",
    "exception_rows",
    "overview",
    "version_text",
]
