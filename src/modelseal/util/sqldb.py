"""SQL plumbing shared by the registry's metadata (``registry.sqldb``) and the governance
state (``governance.store``): one schema, per-thread connections, and ``SqlDatabase.run``,
which runs one short transaction: SQLite ``BEGIN IMMEDIATE`` (one writer at a time across
processes; WAL lets readers go on), PostgreSQL ``SERIALIZABLE`` retried on a serialization
failure or deadlock (psycopg 3, imported only when used). SQL is written once with ``?``
placeholders; the PostgreSQL dialect swaps them for ``%s``. A schema may use ``{C}``
(bytewise ``"C"`` collation on PostgreSQL), ``{REAL}`` and ``{BLOB}``.
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

from modelseal.errors import ModelsealError

log = logging.getLogger("modelseal.sql")
T = TypeVar("T")
Q = Callable[..., Any]


class SqlDatabase:
    """One SQLite file or one PostgreSQL database holding one schema's tables.

    Subclasses set ``SCHEMA``, ``ERROR`` (the error class raised), ``LABEL`` (how errors
    name the database, never its URL) and ``LOCK`` (the advisory lock of schema creation).
    """

    SCHEMA: str = ""
    ERROR: type[ModelsealError] = ModelsealError
    LABEL = "the database"
    LOCK = 7369238

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
            for attempt in range(50):  # switching to WAL can answer "locked" without waiting while
                try:  # another process opens the same new file (SQLite's busy handler is not asked)
                    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 49:
                        raise
                    time.sleep(0.02 + 0.02 * random.random())  # noqa: S311 (jitter, not a secret)
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
                raise self.ERROR(f"{self.LABEL} is unavailable ({type(e).__name__})") from None
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        yield conn

    def _create(self, conn: Any) -> None:
        c = ' COLLATE "C"' if self.dialect == "pg" else ""
        real, blob = ("DOUBLE PRECISION", "BYTEA") if self.dialect == "pg" else ("REAL", "BLOB")
        sql = self.SCHEMA.replace("{C}", c).replace("{REAL}", real).replace("{BLOB}", blob)
        if self.dialect == "sqlite":
            conn.executescript(sql)
            return
        with conn.transaction():
            conn.execute(f"SELECT pg_advisory_xact_lock({int(self.LOCK)})")  # one schema creation at a time
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
                except ModelsealError:
                    raise
                except Exception as e:
                    if self._broken(e) and attempt < 2:
                        self._drop()
                        continue
                    if not self._retryable(e):
                        log.warning(
                            "%s error: %s", self.LABEL, type(e).__name__, exc_info=log.isEnabledFor(logging.DEBUG)
                        )
                        raise self.ERROR(f"{self.LABEL} failed ({type(e).__name__})") from None
            time.sleep(min(0.5, 0.005 * (2**attempt)) * random.random())  # noqa: S311 (jitter, not a secret)
        raise self.ERROR(f"{self.LABEL} is too busy; try again")

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


__all__ = ["Q", "SqlDatabase"]
