"""The console's Certificates page (docs/console.md): the certificates this server's CA issued,
the valid ones expiring soonest first, those expired within the last day (the CA keeps an
expired certificate's record that long), and the revoked serials with when and why.

Decided as ``cert.list`` on ``Certificate:*`` of the caller's environment (roles
security-officer and auditor, governance/policies/default.cedar); what ``modelseal cert
list`` shows, read the same way: the CA folder's records (``issued.json``, ``pki.issue``:
serial, identity, not-after, issue time and the serial a renewal was renewed from) and its
denylist (``pki.denylist``). The CA folder is the issuer's (``pki.backend.Issuer.folder``)
or the one the server checks revocations against. No key is read, nothing is changed:
revoking is ``modelseal cert revoke``.

Bounded: the CA keeps at most ``pki.issue.MAX_ISSUED`` records and ``denylist.MAX_ENTRIES``
serials; the page lists at most ``PAGE_ROWS`` of each part, and counts all. Identities come
from the CA's own records; each is still cut to one printable line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from modelseal.governance.model import Resource
from modelseal.pki import denylist, issue
from modelseal.server.console_page import PREFIX, cut, deps, nav, render, require, resource, run, utc

PAGE_ROWS = 100
SOON_DAYS = 2.0  # leaves live hours to days (pki.backend.MAX_TTL is 7 days): "soon" is within 2
DAY = 86400.0


def _left(seconds: float) -> str:
    """A remaining (or past) span as people read it: ``5 h``, ``2.5 days``, ``40 min``."""
    s = abs(seconds)
    if s < 3600:
        return f"{int(s // 60)} min"
    if s < 2 * DAY:
        return f"{s / 3600:.0f} h"
    return f"{s / DAY:.1f} days"


@dataclass(frozen=True)
class Cert:
    """One issued certificate as the page shows it."""

    serial: str
    identity: str
    not_after: str
    issued_at: str
    renewed_from: str
    left: str  # time to expiry (or since it)
    soon: bool  # valid and expiring within SOON_DAYS


@dataclass(frozen=True)
class Revoked:
    serial: str
    identity: str  # "" when the CA has no record of it any more
    revoked_at: str
    reason: str
    not_after: str


@dataclass
class Inventory:
    """What the page shows of one CA folder at time ``now``."""

    valid: list[Cert] = field(default_factory=list)  # expiring soonest first
    expired: list[Cert] = field(default_factory=list)  # most recently expired first
    revoked: list[Revoked] = field(default_factory=list)  # most recently revoked first
    counts: dict[str, int] = field(default_factory=dict)  # issued, valid, expiring, expired, revoked


def _serial(text: object) -> int | None:
    try:
        return denylist.parse_serial(str(text))
    except ValueError:
        return None


def _time(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def inventory(folder: Path, now: float, limit: int = PAGE_ROWS) -> Inventory:
    """The certificates of the CA at ``folder``: valid ones (expiring soonest first), expired
    ones and revoked serials, at most ``limit`` of each, with the counts of all."""
    rows = issue.issued_rows(folder)
    listed = denylist.load(folder)
    who: dict[int, str] = {}
    valid: list[tuple[float, Cert]] = []
    expired: list[tuple[float, Cert]] = []
    for r in rows:
        serial = _serial(r.get("serial"))
        if serial is None:
            continue
        identity = cut(r.get("identity", ""))
        who[serial] = identity
        if listed.revoked(serial):
            continue
        end = issue.not_after_of(r)
        parent = _serial(r.get(denylist.PARENT))
        c = Cert(
            denylist.serial_hex(serial),
            identity,
            utc(end),
            utc(_time(r.get("issued_at"))),
            "" if parent is None else denylist.serial_hex(parent),
            _left(end - now),
            now <= end < now + SOON_DAYS * DAY,
        )
        (valid if end > now else expired).append((end, c))
    valid.sort(key=lambda p: (p[0], p[1].serial))
    expired.sort(key=lambda p: (-p[0], p[1].serial))
    revoked = sorted(listed.entries.values(), key=lambda e: (-e.revoked_at, e.serial))
    inv = Inventory(
        [c for _, c in valid[:limit]],
        [c for _, c in expired[:limit]],
        [
            Revoked(
                denylist.serial_hex(e.serial), who.get(e.serial, ""), utc(e.revoked_at), cut(e.reason), utc(e.not_after)
            )
            for e in revoked[:limit]
        ],
    )
    inv.counts = {
        "issued": len(who),
        "valid": len(valid),
        "expiring": sum(1 for _, c in valid if c.soon),
        "expired": len(expired),
        "revoked": len(listed.entries),
    }
    return inv


def expiring_soonest(folder: Path, now: float, n: int) -> tuple[list[Cert], dict[str, int]]:
    """The ``n`` valid certificates that expire first, and the counts (the Overview's widget)."""
    inv = inventory(folder, now, n)
    return inv.valid, inv.counts


def ca_folder(request: web.Request) -> Path | None:
    """This server's CA folder: the issuer's, else the one revocations are checked against."""
    d = deps(request)
    folder = getattr(d.issuer, "folder", None) if d.issuer is not None else None
    if isinstance(folder, Path):
        return folder
    return d.ca if isinstance(d.ca, Path) else None


def cert_resource(request: web.Request) -> Resource:
    return resource(request, "Certificate", "*")


async def certs_page(request: web.Request) -> web.Response:
    """``GET /ui/certificates``: valid (expiring soonest first), expired and revoked certificates."""
    await require(request, "cert.list", cert_resource(request))
    folder = ca_folder(request)
    if folder is None:
        return render(request, "certs.html", title="Certificates", configured=False)
    inv = await run(request, inventory, folder, time.time())
    return render(
        request,
        "certs.html",
        title="Certificates",
        configured=True,
        inv=inv,
        page_rows=PAGE_ROWS,
        soon_days=SOON_DAYS,
    )


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/certificates`` and its place in the navigation."""
    nav(f"{PREFIX}/certificates", "Certificates")
    app.router.add_get(f"{PREFIX}/certificates", certs_page)


__all__ = [
    "PAGE_ROWS",
    "SOON_DAYS",
    "Cert",
    "Inventory",
    "Revoked",
    "add_routes",
    "ca_folder",
    "cert_resource",
    "expiring_soonest",
    "inventory",
]
