"""The web console's one-time sign-in links and sessions (docs/console.md), in the
governance database (SQLite or PostgreSQL through ``util.sqldb``), so every instance of a
server shares them.

Only SHA-256 digests of the secrets are stored: a link's token (``secrets.token_urlsafe(32)``,
the ``t`` of ``/ui/login?t=...``) and a session's cookie secret. A link is bound to the
identity and certificate serial that asked for it, expires ``LINK_TTL`` (60 s) after it
was made and is consumed by ``redeem``, which makes the session in the same transaction
(single use under concurrency). A session ends at ``expires`` (at most ``MAX_SESSION``
after it began, and never after its certificate's ``not_after``), after ``idle`` seconds
without a request, on ``end`` (sign-out) and with ``end_serial`` (its certificate revoked).
Bounded: at most ``MAX_LINKS`` unused links per identity, at most ``MAX_SESSIONS`` sessions
per identity (a new one ends the oldest), and ended rows are swept by every new link and
session.
What the store knows nothing of: HTTP, cookies and Cedar (``server.console``).
``load_settings`` reads ``[console]`` of config.toml (on or off, session length, idle time).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import ConsoleError
from modelseal.governance.approvals import parse_duration
from modelseal.governance.store import dialect_of
from modelseal.keys.config import ConfigError, config_table
from modelseal.util.sqldb import Q, SqlDatabase


@dataclass(frozen=True)
class Session:
    """One console session: ``id`` is the SHA-256 (hex) of the cookie's secret, never the
    secret; ``identity`` the SPIFFE id of the certificate that opened it (``serial``, hex);
    ``via`` is ``link`` (``modelseal console login``) or ``certificate`` (the browser's own);
    ``csrf`` the token every form carries; times are POSIX seconds."""

    id: str
    identity: str
    serial: str
    via: str
    csrf: str
    created: float
    expires: float


LINK_TTL = 60.0
MAX_SESSION = 8 * 3600.0
DEFAULT_IDLE = 30 * 60.0
MAX_LINKS = 5  # live, unused links per identity: more is refused until one expires
MAX_SESSIONS = 16  # per identity: a new one ends the oldest beyond it
SEEN_EVERY = 15.0  # a request refreshes ``seen`` at most this often (one write, not one per request)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS console_links (
    id TEXT PRIMARY KEY, identity TEXT NOT NULL, serial TEXT NOT NULL, not_after {REAL} NOT NULL,
    created {REAL} NOT NULL, expires {REAL} NOT NULL);
CREATE TABLE IF NOT EXISTS console_sessions (
    id TEXT PRIMARY KEY, identity TEXT NOT NULL, serial TEXT NOT NULL, via TEXT NOT NULL,
    csrf TEXT NOT NULL, created {REAL} NOT NULL, expires {REAL} NOT NULL, seen {REAL} NOT NULL);
CREATE INDEX IF NOT EXISTS console_sessions_serial ON console_sessions (serial);
"""
_SELECT = "SELECT id, identity, serial, via, csrf, created, expires, seen FROM console_sessions"


@dataclass(frozen=True)
class ConsoleSettings:
    """``[console]`` of config.toml: a session's length (at most 8 h) and idle timeout;
    ``clock`` is the console's time (tests set it)."""

    session: float = MAX_SESSION
    idle: float = DEFAULT_IDLE
    clock: Callable[[], float] = field(default=time.time, compare=False)


def load_settings(home: Path | None = None) -> tuple[bool, ConsoleSettings]:
    """Whether ``[console] enabled`` is set, and the settings; ``ConfigError`` if bad."""
    table = config_table("console", home)
    unknown = set(table) - {"enabled", "session", "idle"}
    if unknown:
        raise ConfigError(f"config: [console] has no setting {sorted(unknown)[0][:40]!r}")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError("config: [console] enabled must be true or false")
    try:
        length = parse_duration(str(table.get("session", "8h")), "[console] session")
        idle = parse_duration(str(table.get("idle", "30m")), "[console] idle")
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    if length > MAX_SESSION or idle > length:
        raise ConfigError("config: [console] session is at most 8h, and idle at most the session")
    return enabled, ConsoleSettings(length, idle)


def digest(secret: str) -> str:
    """The stored form of a token or cookie secret: SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _session(row: Any) -> tuple[Session, float]:
    s = Session(str(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]), float(row[5]), float(row[6]))
    return s, float(row[7])


class ConsoleSessions(SqlDatabase):
    """The links and sessions of one governance database (module docstring)."""

    SCHEMA = _SCHEMA
    ERROR = ConsoleError
    LABEL = "the governance database"
    LOCK = 7369251

    def __init__(self, dialect: str, target: str, idle: float = DEFAULT_IDLE, length: float = MAX_SESSION) -> None:
        if not 0 < length <= MAX_SESSION or not 0 < idle <= length:
            raise ValueError("a console session lasts at most 8 h, its idle timeout at most that")
        self.idle, self.length = idle, length
        super().__init__(dialect, target)

    @classmethod
    def open(cls, target: str, idle: float = DEFAULT_IDLE, length: float = MAX_SESSION) -> ConsoleSessions:
        """On the same target as ``governance.store.GovStore.open``."""
        return cls(*dialect_of(target), idle=idle, length=length)

    # -- links -------------------------------------------------------------------------

    def make_link(self, identity: str, serial: str, not_after: float, now: float | None = None) -> str:
        """A new one-time token for ``identity`` (its certificate ``serial``, valid until
        ``not_after``); only its digest is kept. Expired links are swept on the way."""
        t = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        row = (digest(token), identity, serial, not_after, t, t + LINK_TTL)

        def tx(q: Q) -> None:
            q("DELETE FROM console_links WHERE expires <= ?", t)
            live = q("SELECT COUNT(*) FROM console_links WHERE identity = ?", identity).fetchone()[0]
            if int(live) >= MAX_LINKS:
                raise ConsoleError(f"{MAX_LINKS} sign-in links of this identity are unused: wait a minute")
            q(
                "INSERT INTO console_links (id, identity, serial, not_after, created, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                *row,
            )

        self.run(tx)
        return token

    def link_identity(self, token: str, now: float | None = None) -> str:
        """The identity a live link signs in as (nothing is consumed); ``ConsoleError`` for
        a link that is unknown, used or expired."""
        t = time.time() if now is None else now
        rows = self.run(
            lambda q: q("SELECT identity, expires FROM console_links WHERE id = ?", digest(token)).fetchall(),
            write=False,
        )
        if not rows or float(rows[0][1]) <= t:
            raise ConsoleError("this sign-in link is unknown, used or expired: run 'modelseal console login' again")
        return str(rows[0][0])

    def redeem(self, token: str, now: float | None = None) -> tuple[Session, str]:
        """Consume the link ``token`` and open its session, in one transaction: the session
        and its cookie secret. ``ConsoleError`` if the link is unknown, used or expired."""
        t = time.time() if now is None else now

        def tx(q: Q) -> tuple[Session, str] | None:
            rows = q(
                "SELECT identity, serial, not_after, expires FROM console_links WHERE id = ?", digest(token)
            ).fetchall()
            if not rows:
                return None
            q("DELETE FROM console_links WHERE id = ?", digest(token))
            identity, serial, not_after, expires = rows[0]
            if float(expires) <= t:
                return None
            return self._insert(q, str(identity), str(serial), "link", float(not_after), t)

        out = self.run(tx)
        if out is None:
            raise ConsoleError("this sign-in link is unknown, used or expired: run 'modelseal console login' again")
        return out

    # -- sessions ----------------------------------------------------------------------

    def _insert(self, q: Q, identity: str, serial: str, via: str, not_after: float, t: float) -> tuple[Session, str]:
        secret = secrets.token_urlsafe(32)
        expires = min(t + self.length, not_after)
        if expires <= t:
            raise ConsoleError("the certificate has expired: renew it and sign in again")
        s = Session(digest(secret), identity, serial, via, secrets.token_urlsafe(32), t, expires)
        q("DELETE FROM console_sessions WHERE expires <= ? OR seen <= ?", t, t - self.idle)  # the ended ones
        q(
            "INSERT INTO console_sessions (id, identity, serial, via, csrf, created, expires, seen)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            s.id,
            s.identity,
            s.serial,
            s.via,
            s.csrf,
            s.created,
            s.expires,
            t,
        )
        q(
            "DELETE FROM console_sessions WHERE identity = ? AND id NOT IN"
            " (SELECT id FROM console_sessions WHERE identity = ? ORDER BY created DESC, id LIMIT ?)",
            identity,
            identity,
            MAX_SESSIONS,
        )
        return s, secret

    def open_session(
        self, identity: str, serial: str, not_after: float, via: str = "certificate", now: float | None = None
    ) -> tuple[Session, str]:
        """A session for a browser that presented its own certificate (no link)."""
        t = time.time() if now is None else now
        return self.run(lambda q: self._insert(q, identity, serial, via, not_after, t))

    def lookup(self, secret: str, now: float | None = None) -> tuple[Session | None, bool]:
        """The live session of the cookie ``secret``, and whether a session of it ended just
        now (expired or idle: removed here, so the caller audits it once)."""
        t = time.time() if now is None else now
        sid = digest(secret)
        rows = self.run(lambda q: q(_SELECT + " WHERE id = ?", sid).fetchall(), write=False)
        if not rows:
            return None, False
        s, seen = _session(rows[0])
        if not hmac.compare_digest(s.id, sid):  # the index found it; keep the comparison constant-time anyway
            return None, False
        if t >= s.expires or t - seen >= self.idle:
            gone = self.run(lambda q: q("DELETE FROM console_sessions WHERE id = ?", sid).rowcount)
            return None, bool(gone)
        if t - seen >= SEEN_EVERY:
            self.run(lambda q: q("UPDATE console_sessions SET seen = ? WHERE id = ? AND seen < ?", t, sid, t))
        return s, False

    def end(self, session_id: str) -> bool:
        """End the session ``session_id`` (its digest); whether one was live."""
        return bool(self.run(lambda q: q("DELETE FROM console_sessions WHERE id = ?", session_id).rowcount))

    def end_serial(self, serial: str) -> int:
        """End every session of the certificate ``serial`` (hex); how many."""
        return int(self.run(lambda q: q("DELETE FROM console_sessions WHERE serial = ?", serial).rowcount))

    def live(self, now: float | None = None) -> list[Session]:
        """The sessions not past their end (idle ones included until their next request)."""
        t = time.time() if now is None else now
        rows = self.run(
            lambda q: q(_SELECT + " WHERE expires > ? ORDER BY created", t).fetchall(),
            write=False,
        )
        return [_session(r)[0] for r in rows]


__all__ = [
    "DEFAULT_IDLE",
    "LINK_TTL",
    "MAX_LINKS",
    "MAX_SESSION",
    "MAX_SESSIONS",
    "ConsoleSessions",
    "ConsoleSettings",
    "Session",
    "digest",
    "load_settings",
]
