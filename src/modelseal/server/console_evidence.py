"""The console's Evidence page (docs/console.md, docs/evidence.md): what an evidence bundle
holds, and a form that exports one for a window of UTC days, answered as a download
(``evidence-<YYYYMMDD>-<YYYYMMDD>.tar.gz``, the bundle's folder in a gzip tar).

Decided as ``evidence.read`` on ``Audit:evidence`` of the caller's environment (role
auditor in the shipped policy), for the page and for the export. The bundle is exactly what
``modelseal evidence export`` writes (``evidence.bundle.export``, in the console's pool)
over this server's own state: ``$MODELSEAL_HOME`` (keys, CA, records), the audit log the
server writes (whose host audit key signs the manifest, as the CLI's export signs with it)
and the server's governance database, with the server's key service for the key
inventory. Of the CLI's options only the window is offered: ``--tls`` would make the server
connect where a form says, and ``--tls-report``, ``--witness``, ``--data``, ``--out`` and
``--governance-db`` name paths, which a request never does. The window is at most
``MAX_DAYS`` days (the CLI sets no bound; a browser request should).

The bundle is written under ``<home>/console-exports/`` (0700, a fresh folder per export,
removed once answered; one left by a crash is removed by a later export after
``STALE_SECONDS``), checked with ``evidence.verify.check`` under this host's audit keys
before it is sent, and packed as regular files and folders only. The archive's SHA-256 and
the manifest's are logged, put in an audit event (``evidence-export``), sent as
``X-Modelseal-Evidence-SHA256`` and ``X-Modelseal-Evidence-Manifest-SHA256``, and shown in
the page's list of this worker's recent exports. One export runs at a time per worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from modelseal.audit.events import AuditEvent
from modelseal.audit.store import PostgresStore, SqliteStore
from modelseal.errors import EvidenceError
from modelseal.evidence import verify
from modelseal.evidence.bundle import Exported, Sources, export
from modelseal.evidence.model import (
    INDEX,
    ITEMS,
    MANIFEST,
    RECORD_KINDS,
    RECORDS_DIR,
    REPORT,
    SECTIONS,
    SIGNATURE,
    STATE_AT_EXPORT,
    Window,
)
from modelseal.keys.service import KeyService, printable
from modelseal.server import authz
from modelseal.server.console_page import (
    POOL,
    PREFIX,
    ConsoleDeps,
    deps,
    form,
    nav,
    render,
    require,
    resource,
    run,
    session,
)

log = logging.getLogger("modelseal.server")

DEFAULT_DAYS = 30
MAX_DAYS = 366
DAY = 86400.0
SPOOL = "console-exports"
STALE_SECONDS = 3600.0
CHUNK = 1 << 16
RECENT = 10
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class Content:
    """One file (or family of files) of a bundle as the page lists it."""

    name: str
    title: str
    items: tuple[tuple[str, str, bool], ...] = ()  # (item, title, state at export)


def contents() -> list[Content]:
    """What every bundle holds, in the manifest's order (``evidence.model``)."""
    out = [Content(INDEX, "The index: window, host, signer, audit verification, every control and its status")]
    for section, (name, title) in SECTIONS.items():
        items = tuple((i, t, i in STATE_AT_EXPORT) for i, t in ITEMS.items() if i.startswith(section + "."))
        out.append(Content(name, title, items))
    for kind, item in RECORD_KINDS.items():
        out.append(Content(f"{RECORDS_DIR}/{kind}/", f"Copies of the signed records cited by {item}"))
    out.append(Content(REPORT, "A self-contained HTML report of the same data"))
    out.append(Content(MANIFEST, "Every file above with its SHA-256 and size"))
    out.append(Content(SIGNATURE, "The host audit key's Ed25519 signature over the manifest"))
    return out


def day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def default_window(now: float) -> tuple[str, str]:
    """The last ``DEFAULT_DAYS`` days, today included: ``(since, until)`` dates."""
    return day(now - (DEFAULT_DAYS - 1) * DAY), day(now)


def parse_window(since: str, until: str) -> Window:
    """Two UTC dates (``until`` included), at most ``MAX_DAYS`` days apart; ``EvidenceError``."""
    since, until = since.strip(), until.strip()
    if not _DATE.fullmatch(since) or not _DATE.fullmatch(until):
        raise EvidenceError("the window is two dates, YYYY-MM-DD (UTC)")
    window = Window.parse(since, until)
    if window.end - window.start > MAX_DAYS * DAY:
        raise EvidenceError(f"the window is at most {MAX_DAYS} days")
    return window


def file_name(window: Window) -> str:
    """``evidence-<first day>-<last day>.tar.gz`` (both days included)."""
    first, last = day(window.start), day(window.end - 1)
    return f"evidence-{first.replace('-', '')}-{last.replace('-', '')}.tar.gz"


def audit_target(d: ConsoleDeps) -> str | Path:
    """The audit log this server writes (its store's file or URL), else the CLI's rule."""
    store = getattr(d.audit, "store", None)  # the sink wrappers pass attributes through
    if isinstance(store, SqliteStore):
        return store.path
    if isinstance(store, PostgresStore):
        return store.url
    return os.environ.get("MODELSEAL_AUDIT_URL") or d.home / "audit.db"


def governance_target(d: ConsoleDeps) -> str | None:
    """The governance database of this server (``governance.store.open_target``'s target)."""
    return d.target or None


def describe_target(target: str | Path | None) -> str:
    """Where a database is, without its URL (which may name hosts and users)."""
    if target is None:
        return "none on this server"
    return "PostgreSQL" if str(target).startswith(("postgresql://", "postgres://")) else "a SQLite file on this server"


@dataclass(frozen=True)
class Built:
    """A packed bundle: the archive (in ``spool``, the caller removes it) and what it holds."""

    spool: Path
    archive: Path
    filename: str
    sha256: str
    manifest_sha256: str
    size: int
    exported: Exported


def pack(folder: Path, dest: Path, top: str) -> str:
    """``folder`` as a gzip tar at ``dest`` under the folder name ``top``: regular files and
    folders only (0600 and 0700, no owner names); the archive's SHA-256 (hex)."""
    with tarfile.open(dest, "x:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in [folder, *sorted(folder.rglob("*"))]:
            rel = path.relative_to(folder)
            name = top if rel == Path(".") else f"{top}/{rel.as_posix()}"
            st = path.lstat()
            info = tarfile.TarInfo(name)
            info.mtime, info.uname, info.gname = int(st.st_mtime), "", ""
            if path.is_symlink():
                raise EvidenceError(f"the bundle holds a link {rel}: not packed")
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            elif path.is_file():
                info.size, info.mode = st.st_size, 0o600
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                raise EvidenceError(f"the bundle holds {rel}, not a regular file: not packed")
    h = hashlib.sha256()
    with dest.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_spool(root: Path, now: float) -> None:
    """Remove what exports that died left in ``root`` (older than ``STALE_SECONDS``)."""
    for p in root.glob("evidence-*"):
        try:
            if p.is_dir() and not p.is_symlink() and now - p.lstat().st_mtime > STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue


def build(src: Sources, svc: KeyService, window: Window, now: float | None = None) -> Built:
    """Export the bundle of ``window`` into a fresh folder under ``<home>/console-exports``,
    verify it under this host's audit keys, and pack it; ``EvidenceError`` otherwise."""
    t = time.time() if now is None else now
    root = src.home / SPOOL
    root.mkdir(mode=0o700, exist_ok=True)
    if root.is_symlink() or not root.is_dir():
        raise EvidenceError(f"{SPOOL} of this server's home is not a folder")
    clean_spool(root, t)
    spool = Path(tempfile.mkdtemp(prefix="evidence-", dir=root))
    try:
        folder = spool / "bundle"
        done = export(folder, window, src, svc, now=t)
        checked = verify.check(folder, verify.trusted_keys([], src.audit), window)  # the CLI's keys, as a verifier's
        if checked.problems:
            raise EvidenceError(f"the bundle just written does not verify: {checked.problems[0][:200]}")
        name = file_name(window)
        archive = spool / name
        digest = pack(folder, archive, name.removesuffix(".tar.gz"))
        manifest = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
        shutil.rmtree(folder)
        return Built(spool, archive, name, digest, manifest, archive.stat().st_size, done)
    except BaseException:
        shutil.rmtree(spool, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Recent:
    """One export of this worker, as the page lists it."""

    at: str
    identity: str
    window: str
    sha256: str
    manifest_sha256: str
    files: int
    proofs: int
    audit_ok: bool
    gaps: int


@dataclass
class _State:
    lock: asyncio.Lock
    recent: deque[Recent]


STATE: web.AppKey[_State] = web.AppKey("console_evidence", _State)


def sources(d: ConsoleDeps) -> Sources:
    """This server's state as ``evidence.bundle.Sources`` (no TLS reports, no witness)."""
    return Sources(home=d.home, audit=audit_target(d), governance=governance_target(d))


async def _allow(request: web.Request) -> None:
    await require(request, "evidence.read", resource(request, "Audit", "evidence"))


async def evidence_page(request: web.Request) -> web.Response:
    """``GET /ui/evidence``: what a bundle holds, and the export form."""
    await _allow(request)
    d = deps(request)
    since, until = default_window(time.time())
    return render(
        request,
        "evidence.html",
        title="Evidence",
        configured=isinstance(d.svc, KeyService),
        contents=contents(),
        since=since,
        until=until,
        max_days=MAX_DAYS,
        audit_where=describe_target(audit_target(d)),
        governance_where=describe_target(governance_target(d)),
        recent=list(request.app[STATE].recent),
    )


async def _stream(request: web.Request, built: Built) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "application/gzip",
            "Content-Disposition": f'attachment; filename="{built.filename}"',
            "X-Modelseal-Evidence-SHA256": built.sha256,
            "X-Modelseal-Evidence-Manifest-SHA256": built.manifest_sha256,
        }
    )
    resp.content_length = built.size
    await resp.prepare(request)
    with built.archive.open("rb") as f:
        while chunk := await run(request, f.read, CHUNK):
            await resp.write(chunk)
    await resp.write_eof()
    return resp


def _remember(request: web.Request, built: Built, window: Window, who: str) -> None:
    done = built.exported
    start, end = window.to_json()["from"], window.to_json()["to"]
    request.app[STATE].recent.appendleft(
        Recent(
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            printable(who)[:200],
            f"{start} to {end} (end excluded)",
            built.sha256,
            built.manifest_sha256,
            done.files,
            done.proofs,
            done.audit_ok,
            len(done.gaps),
        )
    )
    decider = request.app.get(authz.AUTHZ)
    if decider is not None:
        src = authz.request_source(request)
        event = AuditEvent("evidence-export", "Audit:evidence", "ok", artifact=built.sha256, actor=who, source=src)
        decider.sink.emit(event)
    log.info(
        "evidence bundle %s exported by %s: sha256 %s, manifest sha256 %s, %d files, audit %s",
        built.filename,
        who,
        built.sha256,
        built.manifest_sha256,
        done.files,
        "verifies" if done.audit_ok else "does NOT verify",
    )


async def export_post(request: web.Request) -> web.StreamResponse:
    """``POST /ui/evidence``: build the bundle of the form's window and answer it as a download."""
    fields = await form(request)
    await _allow(request)
    d = deps(request)
    if not isinstance(d.svc, KeyService):
        raise authz.Refusal(503, "UNAVAILABLE", "this server has no key service: evidence export is not available")
    window = parse_window(fields.get("since", ""), fields.get("until", ""))
    state = request.app[STATE]
    if state.lock.locked():
        raise authz.Refusal(429, "TOO_MANY", "an evidence export is already running on this worker: retry shortly")
    async with state.lock:  # one build at a time; the download itself holds no lock
        fut = asyncio.get_running_loop().run_in_executor(request.app[POOL], build, sources(d), d.svc, window)
        try:
            built = await asyncio.shield(fut)
        except asyncio.CancelledError:  # the request was cancelled (shutdown): the thread still finishes
            fut.add_done_callback(_discard)
            raise
    try:
        resp = await _stream(request, built)
        _remember(request, built, window, session(request).identity)  # once the whole archive was sent
        return resp
    finally:
        shutil.rmtree(built.spool, ignore_errors=True)


def _discard(fut: asyncio.Future[Built]) -> None:
    """A build nobody waits for any more: its spool goes as soon as it is done."""
    if not fut.cancelled() and fut.exception() is None:
        shutil.rmtree(fut.result().spool, ignore_errors=True)


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/evidence`` and its place in the navigation."""
    nav(f"{PREFIX}/evidence", "Evidence")
    app[STATE] = _State(asyncio.Lock(), deque(maxlen=RECENT))
    app.router.add_get(f"{PREFIX}/evidence", evidence_page)
    app.router.add_post(f"{PREFIX}/evidence", export_post)


__all__ = [
    "MAX_DAYS",
    "Built",
    "Content",
    "add_routes",
    "audit_target",
    "build",
    "contents",
    "default_window",
    "file_name",
    "governance_target",
    "pack",
    "parse_window",
    "sources",
]
