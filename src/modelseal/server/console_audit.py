"""The console's Audit log page (docs/console.md): the server's audit log, verified entries
only, filtered by operation, actor, key substring, result and a UTC time window, newest
first and paged; and each entry's RFC 9162 inclusion proof against the log's signed tree
head (``/ui/audit/proof?entry=N``), verified by the server before it is shown and again in
the browser by ``console_static/proof.js`` (WebCrypto SHA-256), which says "verified in
this browser" only when the root it recomputes from the event, its leaf and its audit path
equals the tree head's root on the page.

Decided as ``audit.read`` on ``Audit:log`` of the caller's environment (role auditor). A
filter is data: each value at most ``MAX_FIELD`` printable characters, compared as text; the window's times are
``YYYY-MM-DDTHH:MM[:SS]`` in UTC. Every shown field is cut to a short printable line.

What the page reads (``AuditView``): the verified entries, filtered and paged, and the
inclusion proof of one entry against the log's own signed tree head.

Verification is incremental (``MerkleAuditLog.verify_from``: every head recomputed, every
signature checked, batch by batch, from the frontier of the previous read), at most once
per ``CACHE_SECONDS`` per worker, one read at a time; the leaf hashes of the verified entries
are kept (32 bytes each) for the proofs (``evidence.auditproof.ProofTree``, whose subtree
roots stay valid as the log grows: it only appends). Only verified entries are ever shown:
an entry is listed only when the row read back hashes to the verified leaf at its place, so
a row written into the database behind the log's back is never presented as genuine.

The signed tree head is the last verified entry's: its stored head and the Ed25519 signature
of its writer over ``(size, head)`` (``audit.checks.signed_message``, as
``MerkleAuditLog.checkpoint`` exports it), checked again under the configured audit keys
when a proof is made. Listing is newest first, ``PAGE_ROWS`` rows a page, reading at most
``SCAN_ROWS`` entries a page (a filter that matches rarely goes on from a cursor).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web
from cryptography.exceptions import InvalidSignature

from modelseal.audit import merkle
from modelseal.audit.checks import signed_message
from modelseal.audit.hosts import key_id
from modelseal.audit.log import public_key_hex
from modelseal.audit.store import Row
from modelseal.evidence.auditproof import ProofTree, event_time, parse_event
from modelseal.keys.service import printable
from modelseal.server import authz
from modelseal.server.console_page import PREFIX, nav, render, require, resource, run

CACHE_SECONDS = 2.0
PAGE_ROWS = 50
SCAN_ROWS = 5000
BATCH = 1000


@dataclass(frozen=True)
class Filters:
    """What the page filters on (each empty: any); times are POSIX seconds."""

    operation: str = ""
    actor: str = ""
    key: str = ""  # a substring of the key
    result: str = ""
    since: float | None = None
    until: float | None = None

    def match(self, e: dict[str, Any]) -> bool:
        if self.operation and e.get("operation") != self.operation:
            return False
        if self.actor and e.get("actor") != self.actor:
            return False
        if self.result and e.get("result") != self.result:
            return False
        if self.key and self.key not in str(e.get("key", "")):
            return False
        t = event_time(e)
        if self.since is not None and (t is None or t < self.since):
            return False
        return not (self.until is not None and (t is None or t >= self.until))


@dataclass
class Page:
    """One page of matching verified entries, newest first; ``before``: where the next
    (older) page starts (None: the start of the log was reached)."""

    rows: list[dict[str, Any]]
    scanned: tuple[int, int]  # the entries read: (oldest, newest), (0, 0) for none
    before: int | None


@dataclass(frozen=True)
class Status:
    size: int  # verified entries
    ok: bool  # the whole log verified
    reason: str


@dataclass(frozen=True)
class Proof:
    entry: int
    body: str
    leaf: str
    path: list[str]
    size: int
    root: str
    signature: str
    public_key: str
    key_id: str
    server_ok: bool
    server_reason: str


@dataclass
class AuditView:
    """The verified view of one audit log (``audit.log.MerkleAuditLog`` or a sink wrapping it)."""

    log: Any
    now: Callable[[], float] = time.monotonic
    cache_seconds: float = CACHE_SECONDS
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _frontier: merkle.Frontier | None = None
    _leaves: list[bytes] = field(default_factory=list)
    _last: Row | None = None  # the last verified row: the signed tree head
    _anchor: Row | None = None  # the last row of the frontier
    _tree: ProofTree | None = None
    _status: Status = Status(0, False, "not read yet")
    _read_at: float = -1e18

    @staticmethod
    def readable(log: object) -> bool:
        return callable(getattr(log, "verify_from", None)) and hasattr(log, "store")

    def status(self) -> Status:
        with self._lock:
            return self._refresh()

    def _refresh(self) -> Status:
        if self.now() - self._read_at < self.cache_seconds:
            return self._status
        base = 0 if self._frontier is None else self._frontier.size
        del self._leaves[base:]  # what a failed read collected past the frontier is checked again
        self._tree, self._last = None, self._anchor
        collected: list[Row] = []
        v, frontier = self.log.verify_from(self._frontier, BATCH, collected.extend)
        for row in collected:
            self._leaves.append(merkle.leaf_hash(row[1].encode()))
        if collected:
            self._last = collected[-1]
        if v.ok:
            self._frontier, self._anchor = frontier, self._last
        self._status = Status(len(self._leaves), v.ok, "" if v.ok else str(v.reason)[:300])
        self._read_at = self.now()
        return self._status

    def _verified_rows(self, after: int, limit: int) -> list[tuple[Row, dict[str, Any]]]:
        """Rows ``after + 1``... read back, each only if it hashes to its verified leaf."""
        out = []
        for row in self.log.store.rows_after(after, limit):
            seq = row[0]
            if not 1 <= seq <= len(self._leaves) or merkle.leaf_hash(row[1].encode()) != self._leaves[seq - 1]:
                continue
            doc = parse_event(row[1])
            if doc is not None:
                out.append((row, {**doc, "entry": seq}))
        return out

    def after(self, entry: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """The verified events of the entries after ``entry``, oldest first, reading at most
        ``limit`` entries, and the last entry read (``entry`` if none)."""
        with self._lock:
            size = self._refresh().size
            top = min(size, entry + max(0, limit))
            out: list[dict[str, Any]] = []
            cursor = entry
            while cursor < top:
                got = self._verified_rows(cursor, min(BATCH, top - cursor))
                out.extend(e for _row, e in got)
                cursor = min(top, cursor + BATCH)
            return out, max(entry, top)

    def page(self, filters: Filters, before: int | None, n: int = PAGE_ROWS, scan: int = SCAN_ROWS) -> Page:
        """Up to ``n`` matching entries before entry ``before`` (None: the newest), newest
        first, reading at most ``scan`` entries."""
        with self._lock:
            size = self._refresh().size
            top = size if before is None else max(0, min(before - 1, size))
            rows: list[dict[str, Any]] = []
            cursor = top  # the next entry to read, going down
            while cursor > 0 and top - cursor < scan and len(rows) < n:
                start = max(0, cursor - BATCH, top - scan)
                got = self._verified_rows(start, cursor - start)
                cursor_next = start
                for _row, e in reversed(got):
                    if filters.match(e):
                        rows.append(e)
                        if len(rows) >= n:
                            cursor_next = int(e["entry"]) - 1
                            break
                cursor = cursor_next
            scanned = (cursor + 1, top) if top > cursor else (0, 0)
            return Page(rows, scanned, cursor + 1 if cursor > 0 else None)

    def prove(self, entry: int, keys: dict[str, Any]) -> Proof | None:
        """The inclusion proof of verified entry ``entry`` against the signed tree head,
        checked under ``keys`` (key id -> Ed25519 public key); None: no such verified entry."""
        with self._lock:
            size = self._refresh().size
            last = self._last
            if not 1 <= entry <= size or last is None or last[0] != size:
                return None
            got = self._verified_rows(entry - 1, 1)
            if not got or got[0][0][0] != entry:
                return None
            if self._tree is None:
                self._tree = ProofTree(self._leaves)
            path = self._tree.path(entry - 1, size)
            body = got[0][0][1]
        _, last_body, _, head, sig = last
        signer = (parse_event(last_body) or {}).get("signer")
        candidates = [keys[signer]] if isinstance(signer, str) and signer in keys else list(keys.values())
        key = next((k for k in candidates if _verifies(k, sig, size, head)), None)
        leaf = merkle.leaf_hash(body.encode())
        included = merkle.verify_inclusion(entry - 1, size, leaf, path, head)
        reason = "" if included else "the inclusion proof does not lead to the signed tree head"
        if key is None:
            reason = "the tree head's signature does not verify under a configured audit key"
        return Proof(
            entry,
            body,
            leaf.hex(),
            [h.hex() for h in path],
            size,
            head.hex(),
            sig.hex(),
            "" if key is None else public_key_hex(key),
            "" if key is None else key_id(key),
            included and key is not None,
            reason,
        )


def _verifies(key: Any, sig: bytes, size: int, head: bytes) -> bool:
    try:
        key.verify(sig, signed_message(size, head))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


MAX_FIELD = 200
_SHOWN = ("time", "actor", "operation", "key", "version", "result", "artifact", "source", "subject")
VIEW: web.AppKey[AuditView] = web.AppKey("console_audit_view", AuditView)


def _text(value: object, n: int = MAX_FIELD) -> str:
    if value is None:
        return ""
    return printable(str(value))[:n]


def _field(request: web.Request, name: str) -> str:
    value = request.query.get(name, "").strip()
    if len(value) > MAX_FIELD or not value.isprintable():
        raise authz.Refusal(400, "INVALID", f"{name} must be at most {MAX_FIELD} printable characters")
    return value


def _when(request: web.Request, name: str) -> float | None:
    text = _field(request, name)
    if not text:
        return None
    try:
        if len(text) > 19:
            raise ValueError
        t = datetime.fromisoformat(text)
    except ValueError:
        raise authz.Refusal(400, "INVALID", f"{name} must be a UTC time YYYY-MM-DDTHH:MM[:SS]") from None
    if t.tzinfo is not None:
        raise authz.Refusal(400, "INVALID", f"{name} must be a UTC time without an offset")
    return t.replace(tzinfo=UTC).timestamp()


def _entry(request: web.Request, name: str, required: bool) -> int | None:
    text = request.query.get(name, "")
    if not text and not required:
        return None
    if not (text.isdigit() and text.isascii() and len(text) <= 18) or int(text) < 1:
        raise authz.Refusal(400, "INVALID", f"{name} must be an entry number (1 or more)")
    return int(text)


def filters_of(request: web.Request) -> Filters:
    """The page's filters from its query string (``Refusal`` 400 for a malformed one)."""
    since, until = _when(request, "from"), _when(request, "to")
    if since is not None and until is not None and until <= since:
        raise authz.Refusal(400, "INVALID", "the window's end must be after its start")
    return Filters(
        _field(request, "op"), _field(request, "actor"), _field(request, "key"), _field(request, "result"), since, until
    )


def shown(e: dict[str, Any]) -> dict[str, str]:
    """An event as the page shows it: known fields only, each one short printable line."""
    out = {k: _text(e.get(k)) for k in _SHOWN}
    t = e.get("time")
    if isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and 0 <= t < 1e11:
        out["time"] = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
    out["entry"] = str(e.get("entry", ""))
    return out


def _view(request: web.Request) -> AuditView | None:
    return request.app.get(VIEW)


def _keep(request: web.Request, **extra: str) -> str:
    """The query string of this page's filters with ``extra`` (for the next page's link)."""
    keep = {k: request.query[k] for k in ("op", "actor", "key", "result", "from", "to") if request.query.get(k)}
    keep.update(extra)
    return "&".join(f"{k}={_quote(v)}" for k, v in keep.items())


def _quote(value: str) -> str:
    return quote(value, safe="")


async def _allow(request: web.Request) -> None:
    await require(request, "audit.read", resource(request, "Audit", "log"))


async def audit_page(request: web.Request) -> web.Response:
    """``GET /ui/audit``: the verified entries matching the filters, newest first."""
    await _allow(request)
    view = _view(request)
    filters = filters_of(request)
    values = {k: request.query.get(k, "") for k in ("op", "actor", "key", "result", "from", "to")}
    if view is None:
        return render(request, "audit.html", title="Audit log", configured=False, values=values)
    before = _entry(request, "before", False)
    page = await run(request, view.page, filters, before)
    status = await run(request, view.status)
    older = None if page.before is None else _keep(request, before=str(page.before))
    return render(
        request,
        "audit.html",
        title="Audit log",
        configured=True,
        values=values,
        rows=[shown(e) for e in page.rows],
        scanned=page.scanned,
        older=older,
        verified=status,
    )


async def proof_page(request: web.Request) -> web.Response:
    """``GET /ui/audit/proof?entry=N``: entry N, its inclusion proof and the signed tree head."""
    await _allow(request)
    view = _view(request)
    if view is None:
        raise authz.Refusal(503, "UNAVAILABLE", "this server's audit log cannot be read back")
    entry = _entry(request, "entry", True)
    assert entry is not None
    keys = await run(request, view.log.trusted_keys)
    proof = await run(request, view.prove, entry, keys)
    if proof is None:
        raise authz.Refusal(404, "NOT_FOUND", f"entry {entry} is not among the verified entries of the audit log")
    event = view_event(proof.body)
    return render(request, "audit_proof.html", title=f"Audit entry {entry}", proof=proof, event=event)


def view_event(body: str) -> dict[str, str]:
    doc = parse_event(body) or {}
    return {k: _text(v) for k, v in sorted(doc.items())[:64]}


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/audit`` and its place in the navigation."""
    nav(f"{PREFIX}/audit", "Audit log")
    app.router.add_get(f"{PREFIX}/audit", audit_page)
    app.router.add_get(f"{PREFIX}/audit/proof", proof_page)


__all__ = [
    "MAX_FIELD",
    "PAGE_ROWS",
    "SCAN_ROWS",
    "VIEW",
    "AuditView",
    "Filters",
    "Page",
    "Proof",
    "Status",
    "add_routes",
    "filters_of",
    "shown",
]
