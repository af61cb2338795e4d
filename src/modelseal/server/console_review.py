"""The console's Access review page (docs/console.md): every binding, grant and break-glass
window with its last use and flags (``expired``, ``unused``, ``sod-conflict``, ``held``), the
review's digest, and the attestations made of recent reviews.

Decided as the API decides ``GET /modelseal/v1/access/review`` (``server.gov_api``):
``access.review`` on ``Governance:review``; the review is the API's own
(``gov_api.produce_review``: built and kept, so its digest can be attested for 7 days).

Attesting is not done in the browser. An attestation is evidence an auditor checks without
trusting this server (``governance.review``: the reviewer's ECDSA P-256 signature, made with
the private key of their own certificate folder, verified against the connection's
certificate and exported as "Signed access-review attestations"). A browser cannot make that
signature (its client-certificate key signs TLS handshakes only), and a TOTP code proves
only what the server, which holds the TOTP secrets, says: recording it as an attestation
would pass a weaker fact off as the signed one. So where ``access.attest`` is allowed the
page shows the digest and the command that signs (``modelseal access review --attest``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from modelseal.governance import review
from modelseal.server import gov_api, gov_decide
from modelseal.server.console_page import PREFIX, allowed, cut, nav, render, require, resource, run

MAX_ROWS = 500  # entries shown; the CLI and the API give the whole review
ATTESTATIONS = 10  # the latest attestations shown
FLAGS = ("expired", "unused", "sod-conflict", "held")
_TEXT = 200


def when(t: object) -> str:
    """POSIX seconds as UTC; ``never`` for none."""
    if not isinstance(t, int | float) or isinstance(t, bool):
        return "never"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(t)))


@dataclass
class Entry:
    """One binding of the review as the page shows it."""

    id: str
    identity: str
    role: str
    env: str
    kind: str
    expires: str
    last_used: str
    created: str
    created_by: str
    reason: str
    flags: list[str] = field(default_factory=list)
    conflicts_with: list[str] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)


def entries(rv: dict[str, Any], flagged: bool = False) -> tuple[list[Entry], int]:
    """The review's entries (only the flagged ones with ``flagged``), at most ``MAX_ROWS``,
    and how many matched in all."""
    out: list[Entry] = []
    matched = 0
    for e in rv.get("entries", []):
        flags = [cut(f, 40) for f in e.get("flags", [])]
        if flagged and not flags:
            continue
        matched += 1
        if len(out) >= MAX_ROWS:
            continue
        holds = [f"{cut(h.get('id', ''), 40)} ({cut(h.get('identity', ''))})" for h in e.get("holds", [])]
        out.append(
            Entry(
                id=cut(e.get("id", ""), 40),
                identity=cut(e.get("identity", "")),
                role=cut(e.get("role", ""), 40),
                env=cut(e.get("env", ""), 64),
                kind=cut(e.get("kind", ""), 40),
                expires=when(e.get("expires")),
                last_used=when(e.get("last_used")),
                created=when(e.get("created")),
                created_by=cut(e.get("created_by", "")),
                reason=cut(e.get("reason", "")),
                flags=flags,
                conflicts_with=[cut(c, 40) for c in e.get("conflicts_with", [])],
                holds=holds,
            )
        )
    return out, matched


def summary(rv: dict[str, Any]) -> list[tuple[str, int]]:
    """The flag counts of the review, in ``FLAGS`` order (those the review counted)."""
    counts = rv.get("summary", {})
    return [(f, int(counts[f])) for f in FLAGS if isinstance(counts.get(f), int)]


def latest_attestations(reviews: review.Reviews, n: int = ATTESTATIONS) -> list[dict[str, str]]:
    """The ``n`` latest attestations (newest first): review digest, reviewer, when, and the
    SHA-256 of the certificate that verified the signature."""
    rows = reviews.attestations()[-n:]
    return [
        {
            "digest": cut(a.digest, 80),
            "reviewer": cut(a.reviewer),
            "when": when(a.created),
            "certificate": cut(a.certificate, 64),
        }
        for a in reversed(rows)
    ]


async def page(request: web.Request) -> web.Response:
    """``GET /ui/access[?flagged=1]``: a fresh review of every binding (kept for attesting)."""
    await require(request, "access.review", resource(request, "Governance", "review"))
    if gov_decide.STORE not in request.app or gov_decide.REVIEWS not in request.app:
        return render(
            request,
            "review.html",
            title="Access review",
            available=False,
            rows=[],
            matched=0,
            flagged=False,
            summary=[],
            digest="",
            generated="",
            attestations=[],
            can_attest=False,
            max_rows=MAX_ROWS,
        )
    flagged = request.query.get("flagged") == "1"
    rv = await gov_api.produce_review(request)
    rows, matched = entries(rv, flagged)
    attested = await run(request, latest_attestations, request.app[gov_decide.REVIEWS])
    can_attest = await allowed(request, "access.attest", resource(request, "Governance", "review"))
    return render(
        request,
        "review.html",
        title="Access review",
        available=True,
        rows=rows,
        matched=matched,
        flagged=flagged,
        summary=summary(rv),
        digest=cut(rv.get("digest", ""), 80),
        generated=when(rv.get("generated")),
        attestations=attested,
        can_attest=can_attest,
        max_rows=MAX_ROWS,
    )


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/access`` and its place in the navigation."""
    nav(f"{PREFIX}/access", "Access review")
    app.router.add_get(f"{PREFIX}/access", page)


__all__ = ["Entry", "add_routes", "entries", "latest_attestations", "summary"]
