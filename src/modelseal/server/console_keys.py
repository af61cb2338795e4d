"""The console's Keys page (docs/console.md): the broker keys the signed-in identity may list,
each with its versions and their states, the age of its newest active version against its
rotation policy and its cryptoperiod, and a chart of its use per day from the audit log;
``/ui/keys/key?name=NAME`` shows one key, its versions and its use by operation.

Decided exactly as the broker's API decides (``server.keys_api``): the list asks ``key.list``
on ``Key:*`` of each environment the catalog holds keys of (a denial only leaves that
environment's keys out, as ``GET /modelseal/v1/keys`` does), and a key's page asks
``key.list`` on ``Key:NAME`` with its environment and provider (an unknown name is decided
over the caller's environment first, so a name is no probe). A key is described as the API
describes it (``keys_api.describe``: versions are read, never used) and its backing key is
never shown; an error naming it names the broker key instead (``keys_api.hidden``). No
lifecycle action here: rotations and destroys are asked for through the API and approved on
the Approvals page.

Age: of the newest active version, in days. *Rotation due* past the rotation policy of the
key's environment (config.toml's ``rotate_after_days``), *near its cryptoperiod* within
``NEAR_DAYS`` of ``[scan] cryptoperiod_days`` (default 365, the ``std-cryptoperiod``
standard), *past its cryptoperiod* beyond it.

Use: the verified entries of the server's audit log (``console_audit.AuditView``, shared with
the Audit log page: only entries that verify are counted) of the last ``days`` days (UTC
days, at most ``MAX_DAYS``), counted once per entry by the worker's
``console_usage.UsageIndex`` (a view reads only the entries appended since the last one); a
key operation counts for a broker key when its event names one of the spellings of the key's
backing key, and the page says when the entries counted do not reach back to the window's
start.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from modelseal.errors import KeyNotFound, ModelsealError
from modelseal.governance import brokerkeys as bk
from modelseal.keys.config import DEFAULT_ROTATE_DAYS, ConfigError
from modelseal.keys.providers import canonical_key, parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.server import authz, console_svg, keys_api
from modelseal.server.console_audit import AuditView
from modelseal.server.console_page import PREFIX, allowed, cut, deps, nav, render, require, resource, run, utc
from modelseal.server.console_usage import INDEX, SERIES, UsageIndex
from modelseal.telemetry import scankeys
from modelseal.telemetry.scan import scan_table

DAY = 86400.0
DAYS = 30
MAX_DAYS = 90
NEAR_DAYS = 30
MAX_KEYS = 200
SCAN_ROWS = 20_000
OK, DUE, NEAR, PAST, NONE, GONE, UNKNOWN = (
    "ok",
    "rotation due",
    "near cryptoperiod",
    "past cryptoperiod",
    "no active version",
    "destroyed",
    "unknown",
)


@dataclass
class Periods:
    """What ages are judged against: ``[scan] cryptoperiod_days`` and its source note."""

    cryptoperiod_days: int = scankeys.CRYPTOPERIOD_DAYS
    note: str = ""


def periods(home: Any) -> Periods:
    """The cryptoperiod of ``[scan]`` of config.toml (its default, with a note, if it is malformed)."""
    try:
        days = scan_table(home).get("cryptoperiod_days", scankeys.CRYPTOPERIOD_DAYS)
    except ConfigError as e:
        return Periods(note=f"config.toml's [scan] is not usable ({cut(e, 160)}): the default cryptoperiod applies")
    return Periods(int(days))


@dataclass
class KeyRow:
    """One broker key as the page shows it (the API's description, judged)."""

    name: str
    env: str
    provider: str
    created: str
    created_by: str
    static: bool
    versions: list[dict[str, object]] = field(default_factory=list)  # version, state, created, age_days
    min_decryption_version: int = 0
    age_days: float | None = None  # of the newest active version
    rotate_after_days: int = 0
    cryptoperiod_days: int = 0
    status: str = UNKNOWN
    error: str = ""
    uses: int = 0


def judge(doc: dict[str, Any], rotate_after: int, p: Periods, now: float) -> KeyRow:
    """The row of one ``keys_api.describe`` document at time ``now``."""
    row = KeyRow(
        cut(doc.get("name", ""), 128),
        cut(doc.get("env", ""), 64),
        cut(doc.get("provider", ""), 16),
        utc(doc.get("created")),
        cut(doc.get("created_by", ""), 200),
        bool(doc.get("static")),
        rotate_after_days=rotate_after,
        cryptoperiod_days=p.cryptoperiod_days,
    )
    if doc.get("destroyed") is not None:
        row.status = GONE
        return row
    error = doc.get("error")
    if isinstance(error, dict):
        row.error = cut(error.get("message", "cannot be described"), 300)
        return row
    active: list[tuple[int, float]] = []
    for v in doc.get("versions", []) if isinstance(doc.get("versions"), list) else []:
        version, created, state = v.get("version"), v.get("created"), cut(v.get("state", ""), 20)
        if not isinstance(version, int) or not isinstance(created, int | float):
            continue
        age = round((now - created) / DAY, 1) if 0 < created <= now else None
        row.versions.append({"version": version, "state": state, "created": utc(created), "age_days": age})
        if state == "active" and created > 0:
            active.append((version, float(created)))
    row.versions.sort(key=lambda v: int(str(v["version"])))
    mdv = doc.get("min_decryption_version")
    row.min_decryption_version = mdv if isinstance(mdv, int) else 0
    if not active:
        row.status = NONE
        return row
    age = max(0.0, now - max(active)[1]) / DAY
    row.age_days = round(age, 1)
    if age > p.cryptoperiod_days:
        row.status = PAST
    elif age > p.cryptoperiod_days - NEAR_DAYS:
        row.status = NEAR
    elif age > rotate_after:
        row.status = DUE
    else:
        row.status = OK
    return row


def describe_rows(svc: KeyService, entries: list[bk.BrokerKey], p: Periods, now: float) -> list[KeyRow]:
    """Each entry described (``keys_api.describe``, in the console's pool) and judged."""
    out = []
    for e in entries:
        try:
            rotate_after = svc.config.rotation_days(e.env)
        except ModelsealError:  # config.toml unreadable: the rotation policy's default, not the cryptoperiod
            rotate_after = DEFAULT_ROTATE_DAYS
        out.append(judge(keys_api.describe(svc, e), rotate_after, p, now))
    return out


def spellings(entry: bk.BrokerKey) -> set[str]:
    """The key names the audit events of ``entry``'s operations carry: its backing key as
    written, parsed and canonical (``KeyService.wrap`` and the lifecycle), and the recipient
    spelling ``SCHEME:NAME`` an unwrap records."""
    ref = parse_key_uri(entry.backing)
    out = {entry.backing, ref.uri, entry.uri}
    with contextlib.suppress(ModelsealError):
        canon = canonical_key(entry.backing)
        out |= {canon, f"{ref.scheme}:{parse_key_uri(canon).name}"}
    out.add(f"{ref.scheme}:{ref.name}")
    return out


@dataclass
class Usage:
    """Counts per key name, series and day (oldest day first) over ``days`` days ending
    today (UTC); ``complete``: the entries read reached back past the window's start."""

    days: list[str]
    start: float
    counts: dict[str, dict[str, list[int]]]
    read: tuple[int, int]
    complete: bool
    available: bool = True

    def series(self, names: list[str] | None = None) -> list[tuple[str, list[int]]]:
        """The chart's series summed over ``names`` (None: every key)."""
        picked = list(self.counts) if names is None else [n for n in names if n in self.counts]
        return [(s, [sum(self.counts[k][s][i] for k in picked) for i in range(len(self.days))]) for s in SERIES]

    def total(self, name: str) -> int:
        return sum(sum(v) for v in self.counts.get(name, {}).values())


def usage(
    source: AuditView | UsageIndex | None, entries: list[bk.BrokerKey], days: int, now: float, scan: int = SCAN_ROWS
) -> Usage:
    """The use of ``entries`` per day over the last ``days`` days from the verified entries
    of ``source``: the page's ``UsageIndex`` (``server.console_usage``, brought up to date
    here: only new entries are read), or an ``AuditView`` read once (at most ``scan`` of its
    newest entries)."""
    today = now - now % DAY
    start = today - (days - 1) * DAY
    labels = [datetime.fromtimestamp(start + i * DAY, UTC).strftime("%m-%d") for i in range(days)]
    counts = {e.name: {s: [0] * days for s in SERIES} for e in entries}
    if source is None:
        return Usage(labels, start, counts, (0, 0), False, False)
    index = source if isinstance(source, UsageIndex) else UsageIndex(source, per_view=scan)
    index.update()
    owner = {spelled: e.name for e in entries for spelled in spellings(e)}
    for name, rows in index.per_day(owner.get, start, days).items():
        counts[name] = rows
    return Usage(labels, start, counts, index.read(), index.reaches(start))


def _days(request: web.Request) -> int:
    text = request.query.get("days", "")
    if not text:
        return DAYS
    if not (text.isdigit() and text.isascii() and len(text) <= 3) or not 1 <= int(text) <= MAX_DAYS:
        raise authz.Refusal(400, "INVALID", f"days must be a number of days from 1 to {MAX_DAYS}")
    return int(text)


def _view(request: web.Request) -> UsageIndex | None:
    return request.app.get(INDEX)


async def listed(request: web.Request) -> tuple[list[bk.BrokerKey], bool]:
    """The catalog's entries of the environments the identity may ``key.list`` (by name, at
    most ``MAX_KEYS``), and whether more were left out for that bound."""
    d = deps(request)
    entries: list[bk.BrokerKey] = await run(request, d.catalog.all)
    shown: list[bk.BrokerKey] = []
    for env in sorted({e.env for e in entries}):
        if await allowed(request, "key.list", resource(request, "Key", "*", env=env)):
            shown.extend(e for e in entries if e.env == env)
    shown.sort(key=lambda e: e.name)
    return shown[:MAX_KEYS], len(shown) > MAX_KEYS


def configured(request: web.Request) -> bool:
    """Whether this server brokers keys (a catalog and a key service)."""
    d = deps(request)
    return isinstance(d.catalog, bk.BrokerKeys) and isinstance(d.svc, KeyService)


async def keys_page(request: web.Request) -> web.Response:
    """``GET /ui/keys[?days=N]``: the keys the identity may list, and their use."""
    days = _days(request)
    if not configured(request):
        return render(request, "keys.html", title="Keys", configured=False, days=days)
    d = deps(request)
    now = time.time()
    entries, more = await listed(request)
    p = await run(request, periods, d.home)
    rows = await run(request, describe_rows, d.svc, entries, p, now)
    use = await run(request, usage, _view(request), entries, days, now)
    for r in rows:
        r.uses = use.total(r.name)
    chart = console_svg.column_chart(f"Use of these keys per day, last {days} days (UTC)", use.days, use.series())
    return render(
        request,
        "keys.html",
        title="Keys",
        configured=True,
        days=days,
        rows=rows,
        more=more,
        max_keys=MAX_KEYS,
        periods=p,
        near_days=NEAR_DAYS,
        usage=use,
        chart=chart,
    )


async def _entry(request: web.Request, name: str) -> bk.BrokerKey:
    """``keys_api._entry`` for ``key.list``: decided over the entry (or, for an unknown name,
    over the caller's environment first)."""
    catalog = deps(request).catalog
    try:
        entry: bk.BrokerKey = await run(request, catalog.get, name)
    except KeyNotFound:
        await require(request, "key.list", resource(request, "Key", name))
        raise
    attrs = {"env": entry.env, "provider": parse_key_uri(entry.backing).scheme}
    await require(request, "key.list", resource(request, "Key", name, **attrs))
    return entry


async def key_page(request: web.Request) -> web.Response:
    """``GET /ui/keys/key?name=NAME[&days=N]``: one key, its versions and its use by operation."""
    days = _days(request)
    try:
        name = bk.check_name(request.query.get("name", ""))
    except ModelsealError as e:
        raise authz.Refusal(400, "INVALID", cut(e)) from None
    if not configured(request):
        raise authz.Refusal(503, "UNAVAILABLE", "this server brokers no keys")
    d = deps(request)
    entry = await _entry(request, name)
    now = time.time()
    p = await run(request, periods, d.home)
    row = (await run(request, describe_rows, d.svc, [entry], p, now))[0]
    use = await run(request, usage, _view(request), [entry], days, now)
    row.uses = use.total(entry.name)
    series = use.series([entry.name])
    chart = console_svg.column_chart(f"Use of {entry.name} per day, last {days} days (UTC)", use.days, series)
    totals = [(s, sum(c)) for s, c in series]
    return render(
        request,
        "key.html",
        title=f"Key {cut(name, 128)}",
        row=row,
        days=days,
        periods=p,
        near_days=NEAR_DAYS,
        usage=use,
        chart=chart,
        totals=totals,
    )


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/keys`` and its place in the navigation."""
    nav(f"{PREFIX}/keys", "Keys")
    app.router.add_get(f"{PREFIX}/keys", keys_page)
    app.router.add_get(f"{PREFIX}/keys/key", key_page)


__all__ = [
    "DAYS",
    "MAX_DAYS",
    "MAX_KEYS",
    "SCAN_ROWS",
    "SERIES",
    "KeyRow",
    "Periods",
    "Usage",
    "add_routes",
    "configured",
    "describe_rows",
    "judge",
    "listed",
    "periods",
    "spellings",
    "usage",
]
