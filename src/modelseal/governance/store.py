"""Who is bound to which role: bindings, temporary grants and break-glass windows, one table
(``gov_bindings``) on the server's database (``util.sqldb``), and the ``[governance]``
settings of config.toml.

Every write checks, in the same transaction as the insert, what a binding may never be:
a pattern outside the identity grammar (``spiffe://DOMAIN/ENV/KIND/NAME``, ``*`` segments),
an unknown role, an expiry past ``model.MAX_BINDING`` (a binding) or ``model.MAX_GRANT`` (a
grant or break-glass window, which also need a reason), and a separation-of-duties
conflict: ``key-admin`` and ``reader``/``publisher``/``break-glass`` of one environment can
never meet in one identity, so a new binding is refused when its pattern can match an
identity that an active binding of the opposite side also matches (``patterns_overlap``).
A ``security-officer`` binding names one exact user identity (no ``*``), and nobody binds a
pattern that matches their own identity (``AccessDenied``; a break-glass window is
for its requester and approved by others). The decision itself
is Cedar's (``server.authz``); this module only keeps the rows, and caches them per
identity for the decider, re-read whenever the generation counter moves (every bind and
unbind bumps it, in any process).
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from modelseal.errors import AccessDenied, GovernanceError, IdentityError
from modelseal.governance import model
from modelseal.governance.model import Binding
from modelseal.pki.identity import check_env
from modelseal.util.sqldb import Q, SqlDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gov_bindings (
    id TEXT PRIMARY KEY, pattern TEXT NOT NULL, role TEXT NOT NULL, env TEXT NOT NULL,
    expires {REAL} NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL, created_by TEXT NOT NULL,
    created {REAL} NOT NULL, last_used {REAL});
CREATE INDEX IF NOT EXISTS gov_bindings_expires ON gov_bindings (expires);
CREATE TABLE IF NOT EXISTS gov_generation (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
"""
_SELECT = "SELECT id, pattern, role, env, expires, kind, reason, created_by, created, last_used FROM gov_bindings"
_INSERT = (
    "INSERT INTO gov_bindings (id, pattern, role, env, expires, kind, reason, created_by, created, last_used)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)"
)
MAX_REASON = 500
TOUCH_EVERY = 60.0  # at most one last-use write per binding per minute
DB_NAME = "governance.db"


def shown(text: str, limit: int = 120) -> str:
    """An operator's or a caller's text quoted in a one-line message."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# -- patterns ------------------------------------------------------------------------


def _segments_overlap(a: str, b: str) -> bool:
    """Whether two segments, literals with ``*`` (any run of characters), can match one string:
    the product of their two automata reaches the end of both."""

    @functools.cache
    def go(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "*" and go(i + 1, j):
            return True
        if j < len(b) and b[j] == "*" and go(i, j + 1):
            return True
        if i == len(a) or j == len(b):
            return False
        sa, sb = a[i] == "*", b[j] == "*"
        if sa and sb:
            return False  # both stay: emitting a character changes nothing
        if sa:
            return go(i, j + 1)
        if sb:
            return go(i + 1, j)
        return a[i] == b[j] and go(i + 1, j + 1)

    return go(0, 0)


def patterns_overlap(p: str, q: str) -> bool:
    """Whether some identity matches both binding patterns (``model.identity_matches``:
    ``*`` stays within one path segment)."""
    ps, qs = p.split("/"), q.split("/")
    return len(ps) == len(qs) and all(_segments_overlap(a, b) for a, b in zip(ps, qs, strict=True))


def check_binding_pattern(pattern: str, env: str) -> str:
    """``model.check_pattern`` plus: exactly DOMAIN/ENV/KIND/NAME (no identity has another
    shape), no ``*`` in the trust domain, and an ENV segment that, when literal, is ``env``."""
    model.check_pattern(pattern)
    parts = pattern[len("spiffe://") :].split("/")
    if len(parts) != 4 or "*" in parts[0]:
        raise GovernanceError(f"binding identity {shown(pattern)} is not spiffe://DOMAIN/ENV/KIND/NAME")
    if "*" not in parts[1] and parts[1] != env:
        raise GovernanceError(f"binding identity {shown(pattern)} is of environment {parts[1]!r}, not {env!r}")
    return pattern


DATA_SIDE = (*model.DATA_ROLES, "break-glass")  # break-glass has reader and publisher powers (``gov-sod``)
OFFICER = "security-officer"


def conflicting_roles(role: str) -> tuple[str, ...]:
    """The roles separation of duties keeps away from ``role`` in one environment."""
    if role in model.KEY_ROLES:
        return DATA_SIDE
    if role in DATA_SIDE:
        return model.KEY_ROLES
    return ()


def conflicts(b: Binding, others: Iterable[Binding], now: float) -> list[Binding]:
    """The active bindings among ``others`` that ``b`` would meet in one identity."""
    against = conflicting_roles(b.role)
    return [
        o
        for o in others
        if o.id != b.id
        and o.role in against
        and o.env == b.env
        and o.active(now)
        and patterns_overlap(o.pattern, b.pattern)
    ]


def sod_message(b: Binding, other: Binding) -> str:
    return (
        f"separation of duties: {b.role} for {shown(b.pattern)} would meet {other.role} of binding {other.id} "
        f"({shown(other.pattern)}) in environment {b.env}"
    )


# -- the store -------------------------------------------------------------------------


def _row(r: Any) -> Binding:
    return Binding(
        id=r[0],
        pattern=r[1],
        role=r[2],
        env=r[3],
        expires=float(r[4]),
        kind=r[5],
        reason=r[6],
        created_by=r[7],
        created=float(r[8]),
        last_used=None if r[9] is None else float(r[9]),
    )


def _check_reason(reason: str, required: bool) -> None:
    if required and not reason.strip():
        raise GovernanceError("a grant or break-glass window needs a reason")
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise GovernanceError(f"a reason is one printable line of at most {MAX_REASON} characters")


def binding_json(b: Binding) -> dict[str, object]:
    """A binding as the API and the CLI show it (``identity`` is its pattern)."""
    out = asdict(b)
    out["identity"] = out.pop("pattern")
    return out


def check_new(b: Binding, now: float) -> None:
    """Everything a binding must be, apart from separation of duties (see the module docstring)."""
    try:
        check_env(b.env)
    except IdentityError as e:
        raise GovernanceError(str(e)) from None
    check_binding_pattern(b.pattern, b.env)
    if b.role not in model.ROLES:
        raise GovernanceError(f"unknown role {shown(b.role, 40)}: one of {', '.join(model.ROLES)}")
    if b.kind not in model.KINDS:
        raise GovernanceError(f"unknown binding kind {shown(b.kind, 40)}")
    if b.role == "break-glass" and b.kind != "break-glass":
        raise GovernanceError("the break-glass role is only ever a break-glass window (access break-glass)")
    if b.role == OFFICER and ("*" in b.pattern or b.pattern.split("/")[4] != "user"):
        raise GovernanceError("a security-officer binding names one exact user identity (no *): officers use MFA")
    _check_reason(b.reason, required=b.kind != "binding")
    limit = model.MAX_BINDING if b.kind == "binding" else model.MAX_GRANT
    if not now < b.expires <= now + limit:
        days = limit / 86400
        raise GovernanceError(
            f"a {b.kind} must expire in the future and within {days:g} days"
            + (" (maintenance access is never permanent)" if b.kind != "binding" else "")
        )


def check_not_self(b: Binding, by: str) -> None:
    """Nobody grants themselves access: ``b``'s pattern may not match its creator ``by``."""
    if b.kind != "break-glass" and patterns_overlap(b.pattern, by):
        raise AccessDenied(f"nobody grants themselves access: {shown(b.pattern)} matches {shown(by)}")


def dialect_of(target: str | Path) -> tuple[str, str]:
    """The ``SqlDatabase`` dialect and target of a governance target (``open_target``); a
    SQLite file's folder is made (0700) if missing. Every governance table shares it."""
    text = str(target)
    if text.startswith(("postgresql://", "postgres://")):
        return "pg", text
    Path(text).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return "sqlite", text


class GovStore(SqlDatabase):
    """The bindings of one server (see the module docstring)."""

    SCHEMA = _SCHEMA
    ERROR = GovernanceError
    LABEL = "the governance database"
    LOCK = 7369239

    def __init__(self, dialect: str, target: str) -> None:
        super().__init__(dialect, target)
        self._cache_lock = threading.Lock()
        self._generation: int | None = None
        self._cached: tuple[Binding, ...] = ()
        self._per_identity: dict[str, tuple[Binding, ...]] = {}
        self._touched: dict[str, float] = {}

    @classmethod
    def open(cls, target: str | Path) -> GovStore:
        """``postgresql://...`` or the path of a SQLite file (its folder is made 0700)."""
        return cls(*dialect_of(target))

    @property
    def target(self) -> str:
        """Where the tables live (a SQLite path or a PostgreSQL URL): the other governance
        tables open on the same one. Never shown: a URL may name a host and user."""
        return self._target

    # -- writes ------------------------------------------------------------------------

    @staticmethod
    def _bump(q: Q) -> None:
        if q("UPDATE gov_generation SET value = value + 1 WHERE name = 'bindings'").rowcount == 0:
            q("INSERT INTO gov_generation (name, value) VALUES ('bindings', 1)")

    def bind(self, b: Binding, by: str, now: float | None = None) -> Binding:
        """Store ``b`` with a fresh id, ``by`` as its creator; refused (GovernanceError) when
        it breaks any rule of the module docstring. Returns the stored binding."""
        t = time.time() if now is None else now
        new = Binding(
            id=secrets.token_hex(8),
            pattern=b.pattern,
            role=b.role,
            env=b.env,
            expires=float(b.expires),
            kind=b.kind,
            reason=b.reason,
            created_by=by,
            created=t,
        )
        check_new(new, t)
        check_not_self(new, by)

        def tx(q: Q) -> Binding:
            rows = q(
                _SELECT + " WHERE env = ? AND expires > ?",
                new.env,
                t,
            ).fetchall()
            clash = conflicts(new, [_row(r) for r in rows], t)
            if clash:
                raise GovernanceError(sod_message(new, clash[0]))
            q(
                _INSERT,
                new.id,
                new.pattern,
                new.role,
                new.env,
                new.expires,
                new.kind,
                new.reason,
                new.created_by,
                new.created,
            )
            self._bump(q)
            return new

        return self.run(tx)

    def check(self, b: Binding, now: float | None = None, by: str | None = None) -> None:
        """``bind``'s checks without the write (a request for approval is checked when made)."""
        t = time.time() if now is None else now
        check_new(b, t)
        if by is not None:
            check_not_self(b, by)
        clash = conflicts(b, self.bindings(), t)
        if clash:
            raise GovernanceError(sod_message(b, clash[0]))

    def unbind(self, binding_id: str, by: str) -> Binding:
        """Remove binding ``binding_id`` (the audit log keeps who did it: ``by``)."""
        del by  # the caller audits the removal with its actor

        def tx(q: Q) -> Binding:
            r = q(
                _SELECT + " WHERE id = ?",
                binding_id,
            ).fetchone()
            if r is None:
                raise GovernanceError(f"no binding {shown(binding_id, 40)}")
            q("DELETE FROM gov_bindings WHERE id = ?", binding_id)
            self._bump(q)
            return _row(r)

        return self.run(tx)

    def touch(self, binding_ids: Iterable[str], now: float) -> None:
        """Record that these bindings were just used (at most one write per binding per minute)."""
        with self._cache_lock:
            due = [i for i in dict.fromkeys(binding_ids) if now - self._touched.get(i, -1e18) >= TOUCH_EVERY]
            for i in due:
                self._touched[i] = now
        if not due:
            return

        def tx(q: Q) -> None:
            for i in due:
                q(
                    "UPDATE gov_bindings SET last_used = ? WHERE id = ? AND (last_used IS NULL OR last_used < ?)",
                    now,
                    i,
                    now - TOUCH_EVERY,
                )

        self.run(tx)

    # -- reads -------------------------------------------------------------------------

    def bindings(self, include_expired: bool = False, now: float | None = None) -> list[Binding]:
        """Every binding (the active ones unless ``include_expired``), oldest first."""
        t = time.time() if now is None else now

        def tx(q: Q) -> list[Binding]:
            rows = q(_SELECT + " ORDER BY created, id").fetchall()
            return [_row(r) for r in rows]

        out = self.run(tx, write=False)
        return out if include_expired else [b for b in out if b.active(t)]

    def get(self, binding_id: str) -> Binding | None:
        def tx(q: Q) -> Binding | None:
            r = q(
                _SELECT + " WHERE id = ?",
                binding_id,
            ).fetchone()
            return None if r is None else _row(r)

        return self.run(tx, write=False)

    def any_active(self, role: str, now: float | None = None) -> bool:
        t = time.time() if now is None else now
        return any(b.role == role for b in self.bindings(now=t))

    def _refresh(self) -> None:
        def tx(q: Q) -> tuple[int, list[Any]]:
            g = q("SELECT value FROM gov_generation WHERE name = 'bindings'").fetchone()
            gen = 0 if g is None else int(g[0])
            if gen == self._generation:
                return gen, []
            return gen, q(_SELECT).fetchall()

        gen, rows = self.run(tx, write=False)  # the generation is read first: rows are never older
        with self._cache_lock:
            if gen != self._generation:
                self._cached = tuple(_row(r) for r in rows)
                self._per_identity = {}
                self._generation = gen

    def active_for(self, identity: str, now: float) -> tuple[Binding, ...]:
        """The bindings whose pattern matches ``identity`` and that are active at ``now``."""
        self._refresh()
        with self._cache_lock:
            mine = self._per_identity.get(identity)
            if mine is None:
                mine = tuple(b for b in self._cached if b.matches(identity))
                if len(self._per_identity) > 10_000:
                    self._per_identity.clear()
                self._per_identity[identity] = mine
        return tuple(b for b in mine if b.active(now))


def open_target(data: Path, db: str | None) -> str:
    """Where the governance tables live: ``--db`` (``postgresql://``, or ``sqlite:///PATH``)
    or ``DATA/governance.db``. A URL carrying a password is refused (argv is public)."""
    if db is None:
        return str(data / DB_NAME)
    parts = urlsplit(db)
    if parts.scheme == "sqlite" and parts.path.startswith("/") and not parts.netloc:
        return parts.path  # the registry's own SQLite file: the gov_ tables sit beside its reg_ tables
    if parts.scheme in ("postgresql", "postgres"):
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise ValueError("--db must not carry a password: use PGPASSFILE or PGPASSWORD (docs/deploy.md)")
        return db
    raise ValueError("--db takes postgresql://... or sqlite:///PATH")


__all__ = ["DATA_SIDE", "DB_NAME", "OFFICER", "GovStore", "binding_json", "check_binding_pattern", "check_new"]
__all__ += [
    "check_not_self",
    "conflicting_roles",
    "conflicts",
    "dialect_of",
    "open_target",
    "patterns_overlap",
    "shown",
]
