"""Storage of the audit log's rows: a SQLite file or a PostgreSQL database.

Owns only persistence and write serialisation: one append at a time (SQLite
``BEGIN IMMEDIATE``; PostgreSQL ``LOCK TABLE ... IN EXCLUSIVE MODE``), rows read
back in order, and triggers that refuse UPDATE and DELETE of the rows (in
PostgreSQL also TRUNCATE, which row triggers miss, and changes to the log's
metadata) as a guard against mistakes. Hashing, signing and verification are
``audit.log``'s.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from modelseal.errors import StorageError

Row = tuple[int, str, bytes, bytes, bytes]  # seq, event JSON, leaf, head, signature

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq   INTEGER PRIMARY KEY,
    event TEXT NOT NULL,
    leaf  BLOB NOT NULL,
    head  BLOB NOT NULL,
    sig   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS modelseal_audit_events (
    seq BIGINT PRIMARY KEY, event TEXT NOT NULL, leaf BYTEA NOT NULL, head BYTEA NOT NULL, sig BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS modelseal_audit_meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE OR REPLACE FUNCTION modelseal_audit_append_only() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$ LANGUAGE plpgsql;
DO $$
DECLARE t TEXT;
BEGIN
  -- Row triggers do not fire on TRUNCATE, so each table also gets a statement trigger for it.
  FOREACH t IN ARRAY ARRAY['modelseal_audit_events', 'modelseal_audit_meta'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t::regclass AND tgname = 'modelseal_audit_no_change') THEN
      EXECUTE format('CREATE TRIGGER modelseal_audit_no_change BEFORE UPDATE OR DELETE ON %I '
                     'FOR EACH ROW EXECUTE FUNCTION modelseal_audit_append_only()', t);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t::regclass AND tgname = 'modelseal_audit_no_truncate') THEN
      EXECUTE format('CREATE TRIGGER modelseal_audit_no_truncate BEFORE TRUNCATE ON %I '
                     'FOR EACH STATEMENT EXECUTE FUNCTION modelseal_audit_append_only()', t);
    END IF;
  END LOOP;
END $$;
"""


class AppendTx(Protocol):
    def size(self) -> int: ...

    def leaves(self) -> list[bytes]: ...

    def insert(self, row: Row, public_key_hex: str) -> None: ...

    def head_at(self, seq: int) -> bytes | None: ...

    def rows_after(self, seq: int) -> list[Row]: ...


class AuditStore(Protocol):
    @property
    def identity(self) -> str: ...

    def transaction(self) -> AbstractContextManager[AppendTx]: ...

    def rows(self) -> list[Row]: ...

    def rows_after(self, seq: int, limit: int) -> list[Row]: ...

    def public_key(self) -> str | None: ...


class _Tx:
    """An append transaction over a DB-API connection with the given SQL."""

    def __init__(self, execute: Any, sql: dict[str, str]) -> None:
        self._execute, self._sql = execute, sql

    def size(self) -> int:
        return int(self._execute(self._sql["size"]).fetchone()[0])

    def leaves(self) -> list[bytes]:
        return [bytes(r[0]) for r in self._execute(self._sql["leaves"])]

    def insert(self, row: Row, public_key_hex: str) -> None:
        self._execute(self._sql["insert"], row)
        self._execute(self._sql["key"], (public_key_hex,))

    def head_at(self, seq: int) -> bytes | None:
        row = self._execute(self._sql["head_at"], (seq,)).fetchone()
        return bytes(row[0]) if row else None

    def rows_after(self, seq: int) -> list[Row]:
        return _as_rows(self._execute(self._sql["rows_after"], (seq,)))


_SQLITE_SQL = {
    "size": "SELECT COALESCE(MAX(seq), 0) FROM events",
    "leaves": "SELECT leaf FROM events ORDER BY seq",
    "insert": "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
    "key": "INSERT OR IGNORE INTO meta VALUES ('public_key', ?)",
    "rows": "SELECT seq, event, leaf, head, sig FROM events ORDER BY seq",
    "get_key": "SELECT v FROM meta WHERE k = 'public_key'",
    "head_at": "SELECT head FROM events WHERE seq = ?",
    "rows_after": "SELECT seq, event, leaf, head, sig FROM events WHERE seq > ? ORDER BY seq",
    "page": "SELECT seq, event, leaf, head, sig FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
}
_PG_SQL = {
    "size": "SELECT COALESCE(MAX(seq), 0) FROM modelseal_audit_events",
    "leaves": "SELECT leaf FROM modelseal_audit_events ORDER BY seq",
    "insert": "INSERT INTO modelseal_audit_events VALUES (%s, %s, %s, %s, %s)",
    "key": "INSERT INTO modelseal_audit_meta VALUES ('public_key', %s) ON CONFLICT DO NOTHING",
    "rows": "SELECT seq, event, leaf, head, sig FROM modelseal_audit_events ORDER BY seq",
    "get_key": "SELECT v FROM modelseal_audit_meta WHERE k = 'public_key'",
    "head_at": "SELECT head FROM modelseal_audit_events WHERE seq = %s",
    "rows_after": "SELECT seq, event, leaf, head, sig FROM modelseal_audit_events WHERE seq > %s ORDER BY seq",
    "page": "SELECT seq, event, leaf, head, sig FROM modelseal_audit_events WHERE seq > %s ORDER BY seq LIMIT %s",
}


def _as_rows(cursor: Any) -> list[Row]:
    return [(int(q), str(b), bytes(lf), bytes(h), bytes(sg)) for q, b, lf, h, sg in cursor]


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def identity(self) -> str:
        """Which log this is, for this host's record of its last write: the absolute file."""
        return f"sqlite:{self.path.resolve()}"

    def _connect(self) -> sqlite3.Connection:
        try:
            new = not self.path.exists()
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            if new:
                os.chmod(self.path, 0o600)
            db.executescript(_SQLITE_SCHEMA)
            return db
        except sqlite3.Error as e:
            raise StorageError(f"cannot open the audit log {self.path}: {e}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[AppendTx]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
            yield _Tx(db.execute, _SQLITE_SQL)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StorageError(f"cannot append to the audit log {self.path}: {e}") from None
        finally:
            db.close()

    def rows(self) -> list[Row]:
        db = self._connect()
        try:
            return _as_rows(db.execute(_SQLITE_SQL["rows"]))
        finally:
            db.close()

    def rows_after(self, seq: int, limit: int) -> list[Row]:
        """At most ``limit`` rows after entry ``seq``, in order, read without the append
        lock (a reader that follows the log: ``telemetry.monitor``)."""
        db = self._connect()
        try:
            return _as_rows(db.execute(_SQLITE_SQL["page"], (seq, limit)))
        finally:
            db.close()

    def public_key(self) -> str | None:
        db = self._connect()
        try:
            row = db.execute(_SQLITE_SQL["get_key"]).fetchone()
            return str(row[0]) if row else None
        finally:
            db.close()


class PostgresStore:
    """The same rows in PostgreSQL (for the registry service), via psycopg 3."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._ready = False

    @property
    def identity(self) -> str:
        """Which log this is: the URL without its password (user, host, port, database, options)."""
        return _without_password(self.url)

    def _connect(self) -> Any:
        import psycopg

        try:
            conn = psycopg.connect(self.url, connect_timeout=10)
            if not self._ready:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(7369236)")  # one schema creation at a time
                    conn.execute(_PG_SCHEMA)
                self._ready = True
        except psycopg.Error as e:
            raise StorageError(f"cannot use the audit database ({type(e).__name__})") from None
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[AppendTx]:
        import psycopg

        conn = self._connect()
        try:
            with conn.transaction():
                conn.execute("LOCK TABLE modelseal_audit_events IN EXCLUSIVE MODE")  # one writer at a time
                yield _Tx(conn.execute, _PG_SQL)
        except psycopg.Error as e:
            raise StorageError(f"cannot append to the audit database ({type(e).__name__})") from None
        finally:
            conn.close()

    def rows(self) -> list[Row]:
        conn = self._connect()
        try:
            return _as_rows(conn.execute(_PG_SQL["rows"]))
        finally:
            conn.close()

    def rows_after(self, seq: int, limit: int) -> list[Row]:
        conn = self._connect()
        try:
            return _as_rows(conn.execute(_PG_SQL["page"], (seq, limit)))
        finally:
            conn.close()

    def public_key(self) -> str | None:
        conn = self._connect()
        try:
            row = conn.execute(_PG_SQL["get_key"]).fetchone()
            return str(row[0]) if row else None
        finally:
            conn.close()


_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def _without_password(url: str) -> str:
    # One identity per database, however the URL is spelled (options, user, default port):
    # a new spelling must not start a fresh record that would accept a rolled-back log.
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    host = (parts.hostname or query.get("host") or "localhost").lower()
    port = query.get("port") or "5432"
    with contextlib.suppress(ValueError):
        port = str(parts.port or port)
    dbname = unquote(parts.path.lstrip("/")) or query.get("dbname") or unquote(parts.username or "")
    netloc = f"[{host}]" if ":" in host else host
    return f"postgresql://{netloc}:{port}/{dbname}"


def open_store(target: Path | str) -> AuditStore:
    """``postgresql://...`` for PostgreSQL; anything else is a SQLite file path."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        return PostgresStore(target)
    return SqliteStore(Path(target))
