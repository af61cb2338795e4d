"""The SQL plumbing under the registry's metadata store (``registry.sqlmeta``): one
schema, per-thread connections, and ``Database.run``, which runs one short transaction:
SQLite ``BEGIN IMMEDIATE`` (one writer at a time across processes; WAL lets readers go
on), PostgreSQL ``SERIALIZABLE`` retried on a serialization failure or deadlock (psycopg 3,
imported only when used). SQL is written once with ``?`` placeholders; the PostgreSQL
dialect swaps them for ``%s`` and its schema sorts names and tags in bytewise ``"C"``
order, as SQLite's ``BINARY`` does, which is the order the OCI spec asks for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from modelseal.errors import RegistryError

log = logging.getLogger("modelseal.registry")
T = TypeVar("T")
Q = Callable[..., Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reg_repositories (name TEXT{C} PRIMARY KEY, created {REAL} NOT NULL);
CREATE TABLE IF NOT EXISTS reg_blobs (
    digest TEXT PRIMARY KEY, storage TEXT NOT NULL, size BIGINT NOT NULL, kind TEXT NOT NULL,
    touched {REAL} NOT NULL);
CREATE INDEX IF NOT EXISTS reg_blobs_storage ON reg_blobs (storage);
CREATE TABLE IF NOT EXISTS reg_links (
    repo TEXT NOT NULL, digest TEXT NOT NULL, linked {REAL} NOT NULL, PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS reg_links_digest ON reg_links (digest);
CREATE INDEX IF NOT EXISTS reg_links_linked ON reg_links (linked);
CREATE TABLE IF NOT EXISTS reg_manifests (
    repo TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL, body {BLOB} NOT NULL,
    size BIGINT NOT NULL, subject TEXT, artifact_type TEXT, annotations TEXT, created {REAL} NOT NULL,
    PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS reg_manifests_subject ON reg_manifests (repo, subject);
CREATE TABLE IF NOT EXISTS reg_refs (
    repo TEXT NOT NULL, manifest TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, manifest, digest));
CREATE INDEX IF NOT EXISTS reg_refs_digest ON reg_refs (repo, digest);
CREATE TABLE IF NOT EXISTS reg_tags (
    repo TEXT NOT NULL, tag TEXT{C} NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, tag));
CREATE INDEX IF NOT EXISTS reg_tags_digest ON reg_tags (repo, digest);
CREATE TABLE IF NOT EXISTS reg_uploads (
    id TEXT PRIMARY KEY, repo TEXT NOT NULL, owner TEXT NOT NULL, received BIGINT NOT NULL,
    parts TEXT NOT NULL, next_part INTEGER NOT NULL, created {REAL} NOT NULL, touched {REAL} NOT NULL);
CREATE INDEX IF NOT EXISTS reg_uploads_owner ON reg_uploads (owner);
CREATE INDEX IF NOT EXISTS reg_uploads_touched ON reg_uploads (touched);
CREATE TABLE IF NOT EXISTS reg_holds (
    storage TEXT NOT NULL, holder TEXT NOT NULL, kind TEXT NOT NULL, since {REAL} NOT NULL,
    PRIMARY KEY (storage, holder));
"""
HOLD_TTL = 3600.0  # a pending/sweep hold older than this was left by a dead process


class Busy(RegistryError):
    """The blob is being swept right now; try again."""


class Database:
    """One SQLite file or one PostgreSQL database holding the registry's tables."""

    def __init__(self, dialect: str, target: str) -> None:
        self.dialect, self._target = dialect, target
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        with self._connection() as conn:
            self._create(conn)

    # -- connections and transactions ------------------------------------------------

    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            new = not os.path.exists(self._target)
            conn = sqlite3.connect(self._target, timeout=30, isolation_level=None, check_same_thread=False)
            if new:
                os.chmod(self._target, 0o600)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        import psycopg

        conn = psycopg.connect(self._target, autocommit=True, connect_timeout=10)
        conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        return conn

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._connect()
            except Exception as e:  # sqlite3.Error, psycopg.Error: say which, never the URL
                raise RegistryError(f"the registry database is unavailable ({type(e).__name__})") from None
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        yield conn

    def _create(self, conn: Any) -> None:
        c = ' COLLATE "C"' if self.dialect == "pg" else ""
        real, blob = ("DOUBLE PRECISION", "BYTEA") if self.dialect == "pg" else ("REAL", "BLOB")
        sql = _SCHEMA.replace("{C}", c).replace("{REAL}", real).replace("{BLOB}", blob)
        if self.dialect == "sqlite":
            conn.executescript(sql)
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(7369237)")  # one schema creation at a time
            for stmt in sql.split(";"):
                if stmt.strip():
                    conn.execute(stmt)

    def _retryable(self, e: Exception) -> bool:
        if self.dialect == "sqlite":
            return isinstance(e, sqlite3.OperationalError) and "locked" in str(e)
        import psycopg

        return isinstance(e, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected)

    def _broken(self, e: Exception) -> bool:
        if self.dialect == "sqlite":
            return False
        import psycopg

        return isinstance(e, psycopg.OperationalError)

    def run(self, fn: Callable[[Q], T], write: bool = True) -> T:
        for attempt in range(30):
            with self._connection() as conn:
                try:
                    return self._once(conn, fn, write)
                except RegistryError:
                    raise
                except Exception as e:
                    if self._broken(e) and attempt < 2:
                        self._drop()
                        continue
                    if not self._retryable(e):
                        log.warning(
                            "registry database error: %s", type(e).__name__, exc_info=log.isEnabledFor(logging.DEBUG)
                        )
                        raise RegistryError(f"the registry database failed ({type(e).__name__})") from None
            time.sleep(min(0.5, 0.005 * (2**attempt)) * random.random())  # noqa: S311 (jitter, not a secret)
        raise RegistryError("the registry database is too busy; try again")

    def _once(self, conn: Any, fn: Callable[[Q], T], write: bool) -> T:
        if self.dialect == "sqlite":

            def q(sql: str, *params: Any) -> Any:
                return conn.execute(sql, params)

            if not write:
                return fn(q)
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(q)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out

        def pq(sql: str, *params: Any) -> Any:
            return conn.execute(sql.replace("?", "%s"), params)

        if not write:
            return fn(pq)
        with conn.transaction():
            return fn(pq)

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            with contextlib.suppress(Exception):  # already broken
                conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):  # closing anyway
                conn.close()


__all__ = ["HOLD_TTL", "Busy", "Database", "Q"]
