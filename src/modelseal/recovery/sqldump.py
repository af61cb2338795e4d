"""A logical dump of one schema's tables, and its import (docs/recovery.md, "What a backup holds").

Schemas: ``registry`` (``registry.sqldb``), ``governance`` (every ``governance`` table class:
bindings, MFA enrolments, reviews, holds, policy versions, broker keys, approvals) and
``audit`` (``audit.store``, whose tables are named per dialect: the dump names them
``events`` and ``meta``). The table lists come from each class's ``SCHEMA``; the monitor's
detector state (``telemetry.detectstate``) is not backed up: it is rebuilt from the log.

A dump reads every table in ONE read transaction (SQLite: a read-only connection and one
deferred transaction, a snapshot in WAL mode and a shared lock otherwise; PostgreSQL:
``REPEATABLE READ READ ONLY``, a snapshot), without creating anything at the source. Rows
are JSON lines, bytes tagged ``{"b64": ...}``, in the order of all their columns, so the
same data dumps to the same bytes (a table without rows is not listed). With ``env``, the
rows of a table that has an ``env`` column are those of that environment only.

An import creates the tables with the schema's own classes' ``SCHEMA`` (so a dump of SQLite
imports into PostgreSQL) and loads every row in ONE transaction: a target holding rows is
refused unless ``replace``, which empties it in that same transaction (a target already
holding exactly the dump's rows is left as it is: a finished import run again). With ``env``
(an environment's restore) only the rows of that environment are touched, in the tables with an
``env`` column: they are replaced (every dumped row must be of that environment), the other
environments' rows and the tables without such a column are left as they are. The audit log is
append-only: a target that already holds a prefix of the dump gets the rest appended (so a
finished import run again changes nothing); ``replace`` lifts its triggers only inside the
transaction. Table and column names from a dump must be the target's own, or it is refused.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelseal.audit import merkle
from modelseal.audit.store import open_store
from modelseal.errors import BackupError, BackupTampered
from modelseal.governance.approvals import Approvals
from modelseal.governance.brokerkeys import BrokerKeys
from modelseal.governance.holds import HoldStore
from modelseal.governance.mfa import Mfa
from modelseal.governance.review import Reviews
from modelseal.governance.store import GovStore
from modelseal.governance.versions import PolicyStore
from modelseal.recovery.partcodec import decode_value, encode_value, header_line, split_header
from modelseal.registry.sqldb import Database
from modelseal.util.bounded import json_loads
from modelseal.util.sqldb import SqlDatabase

_CLASSES: dict[str, tuple[type[SqlDatabase], ...]] = {
    "registry": (Database,),
    "governance": (GovStore, Mfa, Reviews, HoldStore, PolicyStore, BrokerKeys, Approvals),
}
_AUDIT_TABLES = {
    "sqlite": {"events": "events", "meta": "meta"},
    "pg": {"events": "modelseal_audit_events", "meta": "modelseal_audit_meta"},
}
_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)")
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")
MAX_ROW_VALUES = 256


def tables(schema: str, dialect: str = "sqlite") -> dict[str, str]:
    """The logical name of each table of ``schema`` mapped to its name in ``dialect``."""
    if schema == "audit":
        return dict(_AUDIT_TABLES[dialect])
    return {t: t for cls in _CLASSES[schema] for t in _TABLE.findall(cls.SCHEMA)}


def _q(ident: str) -> str:
    if not _IDENT.fullmatch(ident):
        raise BackupTampered("a backup part names an invalid table or column")
    return f'"{ident}"'


class _Conn:
    """One connection and ``?``-style ``execute`` over either dialect."""

    def __init__(self, dialect: str, target: str, *, readonly: bool) -> None:
        self.dialect = dialect
        try:
            if dialect == "sqlite":
                uri = f"{Path(target).resolve().as_uri()}?mode={'ro' if readonly else 'rw'}"
                self.raw: Any = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
                self.raw.execute("PRAGMA busy_timeout=30000")
            else:
                import psycopg

                self.raw = psycopg.connect(target, autocommit=True, connect_timeout=10)
        except Exception as e:  # sqlite3.Error, psycopg.Error: say which, never the URL or path's secrets
            raise BackupError(f"the database is unavailable ({type(e).__name__})") from None

    def execute(self, sql: str, *params: Any) -> Any:
        return self.raw.execute(sql if self.dialect == "sqlite" else sql.replace("?", "%s"), params)

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[_Conn]:
        try:
            if self.dialect == "sqlite":
                self.raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self
                except BaseException:
                    self.raw.execute("ROLLBACK")
                    raise
                self.raw.execute("COMMIT")
            else:
                level = "SERIALIZABLE" if write else "REPEATABLE READ READ ONLY"
                with self.raw.transaction():
                    self.raw.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
                    yield self
        except (BackupError, BackupTampered):
            raise
        except Exception as e:
            if isinstance(e, sqlite3.Error) or type(e).__module__.startswith("psycopg"):
                raise BackupError(f"the database failed ({type(e).__name__})") from None
            raise

    def existing(self) -> set[str]:
        if self.dialect == "sqlite":
            return {r[0] for r in self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        return {r[0] for r in self.execute(sql)}

    def columns(self, table: str) -> list[str]:
        if self.dialect == "sqlite":
            return [r[1] for r in self.execute(f"PRAGMA table_info({_q(table)})")]
        sql = (
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = ? ORDER BY ordinal_position"
        )
        return [r[0] for r in self.execute(sql, table)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()


def source_exists(dialect: str, target: str) -> bool:
    """Whether there is anything to dump (a SQLite file that is missing is no component)."""
    return dialect != "sqlite" or Path(target).is_file()


def broker_backings(dialect: str, target: str) -> list[tuple[str, str]]:
    """(env, backing key URI) of every ``gov_broker_keys`` row, destroyed ones too (read-only)."""
    conn = _Conn(dialect, target, readonly=True)
    try:
        with conn.transaction(write=False) as c:
            if "gov_broker_keys" not in c.existing():
                return []
            return [(str(e), str(b)) for e, b in c.execute("SELECT env, backing FROM gov_broker_keys")]
    finally:
        conn.close()


def dump(schema: str, dialect: str, target: str, *, name: str, env: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """The part ``name`` holding every table of ``schema`` at ``target``, and its meta."""
    conn = _Conn(dialect, target, readonly=True)
    out = [header_line(name, "sql", schema=schema, **({"env": env} if env else {}))]
    counts: dict[str, int] = {}
    rows_of: dict[str, list[list[Any]]] = {}
    try:
        with conn.transaction(write=False) as c:
            present = c.existing()
            for logical, physical in sorted(tables(schema, dialect).items()):
                if physical not in present:
                    counts[logical] = 0
                    continue
                cols = c.columns(physical)
                where, params = ("", ()) if env is None or "env" not in cols else (" WHERE env = ?", (env,))
                order = ", ".join(str(i + 1) for i in range(len(cols)))
                sql = f"SELECT {', '.join(_q(x) for x in cols)} FROM {_q(physical)}{where} ORDER BY {order}"  # noqa: S608 (names checked by _q)
                rows = [[encode_value(v) for v in r] for r in c.execute(sql, *params)]
                counts[logical] = len(rows)
                rows_of[logical] = rows
                if rows:  # an empty table and a missing one dump alike: the import makes every table
                    out.append(_table_line(logical, cols, len(rows)))
                out.extend(json.dumps(r, separators=(",", ":"), allow_nan=False).encode() + b"\n" for r in rows)
    finally:
        conn.close()
    meta: dict[str, Any] = {"tables": counts, "rows": sum(counts.values())}
    if env is not None:
        meta["env"] = env
    if schema == "audit":
        events = rows_of.get("events", [])
        leaves = [decode_value(r[2], name) for r in events]
        meta["size"] = len(events)
        meta["root"] = merkle.root(leaves).hex()
    return b"".join(out), meta


def _table_line(table: str, cols: list[str], n: int) -> bytes:
    return json.dumps({"columns": cols, "rows": n, "table": table}, separators=(",", ":")).encode() + b"\n"


def parse(data: bytes, schema: str, name: str) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """The tables of a dump: logical name -> (columns, rows). Bounded, strict."""

    def bad(_why: str) -> BackupTampered:
        return BackupTampered(f"backup part {name} is malformed")

    header, body = split_header(data, name, "sql")
    if header.get("schema") != schema:
        raise BackupTampered(f"backup part {name} holds another schema")
    known = tables(schema)
    lines = body.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
    i = 0
    while i < len(lines):
        head = json_loads(lines[i], max_depth=2, max_values=MAX_ROW_VALUES + 8, error=bad)
        if not isinstance(head, dict) or set(head) != {"columns", "rows", "table"}:
            raise bad("table line")
        table, cols, n = head["table"], head["columns"], head["rows"]
        if table not in known or table in out:
            raise BackupTampered(f"backup part {name} holds a table that is not the {schema} schema's")
        if not isinstance(cols, list) or not all(isinstance(x, str) for x in cols) or len(cols) > MAX_ROW_VALUES:
            raise bad("columns")
        for x in cols:
            _q(x)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(lines) - i - 1:
            raise bad("row count")
        rows = []
        for line in lines[i + 1 : i + 1 + n]:
            r = json_loads(line, max_depth=2, max_values=2 * MAX_ROW_VALUES + 1, error=bad)
            if not isinstance(r, list) or len(r) != len(cols):
                raise bad("row")
            rows.append(tuple(decode_value(v, name) for v in r))
        out[table] = (cols, rows)
        i += 1 + n
    return out


def create_schema(schema: str, dialect: str, target: str) -> None:
    """The tables of ``schema`` at ``target``, made by their own classes' schema text."""
    if schema == "audit":
        open_store(target if dialect == "pg" else Path(target)).public_key()  # creates the tables
        return
    for cls in _CLASSES[schema]:
        db = _Creator(dialect, target, cls)
        db.close()


class _Creator(SqlDatabase):
    """``SqlDatabase`` with another class's schema and schema lock: creates its tables only
    (the table classes' own constructors want services this import has no use for)."""

    ERROR = BackupError
    LABEL = "the database being restored"

    def __init__(self, dialect: str, target: str, cls: type[SqlDatabase]) -> None:
        self.SCHEMA, self.LOCK = cls.SCHEMA, cls.LOCK
        super().__init__(dialect, target)


def load(
    data: bytes, schema: str, dialect: str, target: str, *, name: str, replace: bool, env: str | None = None
) -> dict[str, Any]:
    """Import the dump ``data`` of ``schema`` into ``target`` in one transaction (module docstring)."""
    parsed = parse(data, schema, name)
    if dialect == "sqlite":
        Path(target).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    create_schema(schema, dialect, target)
    conn = _Conn(dialect, target, readonly=False)
    try:
        with conn.transaction(write=True) as c:
            if schema == "audit":
                return _load_audit(c, parsed, name, replace)
            physical = tables(schema, dialect)
            if env is not None:
                return _load_env(c, parsed, physical, schema, env, replace)
            nonempty = [
                t
                for t, p in sorted(physical.items())
                if c.execute(f"SELECT 1 FROM {_q(p)} LIMIT 1").fetchone()  # noqa: S608 (names checked by _q)
            ]
            if nonempty and not replace:
                if _holds_exactly(c, parsed, physical):  # a finished import, run again
                    return {**_counts(parsed), "written": 0}
                raise BackupError(f"the {schema} database is not empty ({nonempty[0]} has rows): restore with replace")
            for p in physical.values():
                c.execute(f"DELETE FROM {_q(p)}")  # noqa: S608 (names checked by _q)
            return _insert_all(c, parsed, physical, schema)
    finally:
        conn.close()


def _counts(parsed: dict[str, tuple[list[str], list[tuple[Any, ...]]]]) -> dict[str, Any]:
    counts = {t: len(rows) for t, (_, rows) in sorted(parsed.items())}
    return {"tables": counts, "rows": sum(counts.values())}


Parsed = dict[str, tuple[list[str], list[tuple[Any, ...]]]]


def _load_env(
    c: _Conn, parsed: Parsed, physical: dict[str, str], schema: str, env: str, replace: bool
) -> dict[str, Any]:
    """``env``'s rows only, in the tables with an ``env`` column (module docstring)."""
    scoped = {t: p for t, p in physical.items() if "env" in c.columns(p)}
    mine = {t: parsed.get(t, ([], [])) for t in scoped}
    for cols, rows in mine.values():
        if rows and ("env" not in cols or any(r[cols.index("env")] != env for r in rows)):
            raise BackupTampered(f"the {schema} part holds rows of another environment than {env}")
    sql = "SELECT 1 FROM {} WHERE env = ? LIMIT 1"
    held = [t for t, p in sorted(scoped.items()) if c.execute(sql.format(_q(p)), env).fetchone()]
    if held and not replace:
        if _holds_exactly(c, mine, scoped, env):
            return {**_counts(mine), "written": 0, "env": env}
        raise BackupError(f"the {schema} database holds rows of {env} ({held[0]}): restore with replace")
    for p in scoped.values():
        c.execute(f"DELETE FROM {_q(p)} WHERE env = ?", env)  # noqa: S608 (names checked by _q)
    return {**_insert_all(c, mine, scoped, schema), "env": env, "kept": sorted(set(physical) - set(scoped))}


def _holds_exactly(c: _Conn, parsed: Parsed, physical: dict[str, str], env: str | None = None) -> bool:
    """Whether every table holds exactly the dump's rows (as multisets), and no others (of
    ``env``'s rows only, when given)."""
    where, params = ("", ()) if env is None else (" WHERE env = ?", (env,))
    for table, p in physical.items():
        cols, rows = parsed.get(table, ([], []))
        if not rows:
            if c.execute(f"SELECT 1 FROM {_q(p)}{where} LIMIT 1", *params).fetchone():  # noqa: S608 (names checked by _q)
                return False
            continue
        if not set(cols) <= set(c.columns(p)):
            return False
        sql = f"SELECT {', '.join(_q(x) for x in cols)} FROM {_q(p)}{where}"  # noqa: S608 (names checked by _q)
        have = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in c.execute(sql, *params)]
        if sorted(map(repr, have)) != sorted(map(repr, rows)):
            return False
    return True


def _insert_all(
    c: _Conn, parsed: dict[str, tuple[list[str], list[tuple[Any, ...]]]], physical: dict[str, str], schema: str
) -> dict[str, Any]:
    for table, (cols, rows) in sorted(parsed.items()):
        _insert(c, physical[table], cols, rows, schema)
    return {**_counts(parsed), "written": sum(len(rows) for _, rows in parsed.values())}


def _insert(c: _Conn, table: str, cols: list[str], rows: list[tuple[Any, ...]], schema: str) -> None:
    if not rows:
        return
    have = set(c.columns(table))
    if not set(cols) <= have:
        raise BackupTampered(f"a backup part names a column the {schema} table {table} does not have")
    sql = f"INSERT INTO {_q(table)} ({', '.join(_q(x) for x in cols)}) VALUES ({', '.join('?' for _ in cols)})"  # noqa: S608 (names checked by _q)
    for r in rows:
        c.execute(sql, *r)


def _load_audit(
    c: _Conn, parsed: dict[str, tuple[list[str], list[tuple[Any, ...]]]], name: str, replace: bool
) -> dict[str, Any]:
    physical = tables("audit", c.dialect)
    ev, meta = physical["events"], physical["meta"]
    if c.dialect == "pg":
        c.execute(f"LOCK TABLE {_q(ev)} IN EXCLUSIVE MODE")  # as every append does
    cols = ["seq", "event", "leaf", "head", "sig"]
    got_cols, rows = parsed.get("events", (cols, []))
    if rows and got_cols != cols:
        raise BackupTampered(f"backup part {name} has unexpected audit columns")
    have = [
        tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
        for r in c.execute(f"SELECT seq, event, leaf, head, sig FROM {_q(ev)} ORDER BY seq")  # noqa: S608 (names checked by _q)
    ]
    have_meta = dict(c.execute(f"SELECT k, v FROM {_q(meta)}").fetchall())  # noqa: S608 (names checked by _q)
    meta_rows = {str(r[0]): str(r[1]) for r in parsed.get("meta", (["k", "v"], []))[1]}
    prefix = have == [tuple(r) for r in rows[: len(have)]] and all(meta_rows.get(k) == v for k, v in have_meta.items())
    if (have or have_meta) and not prefix:
        if not replace:
            raise BackupError("the audit log is not empty and is not a prefix of the backup's: restore with replace")
        with _audit_triggers_lifted(c, ev, meta):
            c.execute(f"DELETE FROM {_q(ev)}")  # noqa: S608 (names checked by _q)
            c.execute(f"DELETE FROM {_q(meta)}")  # noqa: S608 (names checked by _q)
        have, have_meta = [], {}
    new = rows[len(have) :]
    _insert(c, ev, cols, new, "audit")
    _insert(c, meta, ["k", "v"], [(k, v) for k, v in sorted(meta_rows.items()) if k not in have_meta], "audit")
    return {
        "tables": {"events": len(rows), "meta": len(meta_rows)},
        "rows": len(rows) + len(meta_rows),
        "appended": len(new),
    }


@contextlib.contextmanager
def _audit_triggers_lifted(c: _Conn, ev: str, meta: str) -> Iterator[None]:
    """The append-only triggers off for the statements inside, in the import's transaction
    (an operator's replace; rolled back with it if anything fails)."""
    if c.dialect == "sqlite":
        saved = c.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN (?, ?)", ev, meta
        ).fetchall()
        names = [
            r[0]
            for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN (?, ?)", ev, meta)
        ]
        for n in names:
            c.execute(f"DROP TRIGGER {_q(n)}")
        yield
        for (sql,) in saved:
            c.execute(sql)
        return
    for t in (ev, meta):
        c.execute(f"ALTER TABLE {_q(t)} DISABLE TRIGGER USER")
    yield
    for t in (ev, meta):
        c.execute(f"ALTER TABLE {_q(t)} ENABLE TRIGGER USER")


__all__ = ["broker_backings", "create_schema", "dump", "load", "parse", "source_exists", "tables"]
