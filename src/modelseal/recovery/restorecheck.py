"""Before a restore writes anything: every refusal that can be predicted, and whether a
target already holds a part (docs/recovery.md, "Restores").

``refusal(name, kind, data, loc, replace, env)`` is the one-line reason
``restoreparts.restore_part`` would refuse part ``name`` at ``loc``, or None: a SQL part with
no database to go to, or whose database holds other rows (the audit log: rows that are not a
prefix of the backup's) without ``replace``; a files part over files that differ (the version
records excepted: they are merged), or a CA folder that does not hold the backup's CA, without
``replace``; an OpenBao part without an OpenBao to go to, or without ``replace``. For an
environment's restore (``env``) it follows ``restore_part``'s rules for one: a part of the whole
host (``restoreparts.HOST_WIDE``) is refused; the keystore part, merged, is refused only when
it is not that environment's or one of its keys differs from the live one (without
``replace``; ``keys.keystore_export.merge_plan``); the governance part only when the database
holds other rows *of that environment* (without ``replace``), and a part holding another
environment's rows is ``BackupTampered``. ``run_restore`` asks it of every selected part before
the first write, so a predictable refusal leaves the host untouched instead of half restored.

``holds(name, kind, data, loc, env)``: whether the target already holds the part (the files
byte for byte, the CA by ``recovery.camerge.holds``, the SQL tables row for row, the
audit log when it *starts with* the backup's entries: events appended since are kept; an
OpenBao cluster never: its state cannot be compared; with ``env``: the live keystore holds
every key of the part as it is, the environment's rows are exactly the part's). A resumed
restore verifies each part its journal says is done this way, and restores again any that is
not.

Reads only: SQLite is opened ``mode=ro`` (a missing file is an empty target), PostgreSQL
in a read-only transaction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelseal.errors import BackupTampered
from modelseal.keys.keystore_export import merge_plan
from modelseal.recovery import camerge, sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.partcodec import decode_files
from modelseal.recovery.parts import VERSION_RECORDS, audit_key_folder
from modelseal.recovery.restoreparts import HOST_WIDE

Rows = dict[str, tuple[list[str], list[tuple[Any, ...]]]]


def _file_differs(path: Path, data: bytes) -> bool:
    if path.is_symlink():
        return True  # restore_part never writes through one
    try:
        return path.read_bytes() != data
    except FileNotFoundError:
        return False  # nothing there: the restore writes it
    except OSError:
        return True


def _files(name: str, data: bytes, loc: Locations) -> list[tuple[Path, bytes]]:
    """Where each file of a keystore or config part goes, and its bytes (version records,
    which are merged, left out)."""
    _, files = decode_files(data, name)
    out = []
    for n, (content, _mode) in files.items():
        if n.startswith("audit/"):
            out.append((audit_key_folder(loc) / n.removeprefix("audit/"), content))
        elif n not in VERSION_RECORDS:
            out.append((loc.home / n, content))
    return out


def _target(name: str, loc: Locations) -> tuple[str, str] | None:
    return {"governance": loc.governance_target, "registry": loc.registry_target}.get(name, loc.audit_target)()


def _foreign_rows(name: str, parsed: Rows, env: str, cols_of: dict[str, list[str]]) -> None:
    """An environment's part holding another environment's rows, in a table with an ``env``
    column (the target's, where it has the table, else the part's), is tampered with."""
    for table, (cols, rows) in parsed.items():
        scoped = rows and "env" in cols_of.get(table, cols)
        if scoped and ("env" not in cols or any(r[cols.index("env")] != env for r in rows)):
            raise BackupTampered(f"the {name} part holds rows of another environment than {env}")


def _state(name: str, data: bytes, loc: Locations, env: str | None = None) -> tuple[str, Rows]:
    """How the SQL target of part ``name`` relates to its dump: ``empty``, ``same``, ``prefix``
    (the audit log: a start of the backup's, the rest to append), ``extends`` (the audit log:
    the backup's entries and more), or ``other``; with ``env`` (the governance part of an
    environment's restore), of that environment's rows only."""
    parsed = sqldump.parse(data, name, name)
    target = _target(name, loc)
    assert target is not None
    dialect, where = target
    if dialect == "sqlite" and not Path(where).is_file():
        if env is not None:
            _foreign_rows(name, parsed, env, {})
        return "empty", parsed
    conn = sqldump._Conn(dialect, where, readonly=True)
    try:
        with conn.transaction(write=False) as c:
            present = c.existing()
            physical = {t: p for t, p in sqldump.tables(name, dialect).items() if p in present}
            if name == "audit":
                return _audit_state(c, parsed, physical), parsed
            if env is not None:
                return _env_state(c, name, parsed, physical, env), parsed
            q = sqldump._q
            if not any(c.execute(f"SELECT 1 FROM {q(p)} LIMIT 1").fetchone() for p in physical.values()):  # noqa: S608 (names checked by _q)
                return "empty", parsed
            if any(rows for t, (_, rows) in parsed.items() if t not in physical):
                return "other", parsed
            return ("same" if sqldump._holds_exactly(c, parsed, physical) else "other"), parsed
    finally:
        conn.close()


def _env_state(c: Any, name: str, parsed: Rows, physical: dict[str, str], env: str) -> str:
    """``env``'s rows against the part's, in the tables with an ``env`` column (as
    ``sqldump.load(env=...)`` decides: the others are left as they are)."""
    cols_of = {t: c.columns(p) for t, p in physical.items()}
    _foreign_rows(name, parsed, env, cols_of)
    scoped = {t: p for t, p in physical.items() if "env" in cols_of[t]}
    mine = {t: parsed.get(t, ([], [])) for t in scoped}
    sql = "SELECT 1 FROM {} WHERE env = ? LIMIT 1"
    if not any(c.execute(sql.format(sqldump._q(p)), env).fetchone() for p in scoped.values()):
        return "empty"
    return "same" if sqldump._holds_exactly(c, mine, scoped, env) else "other"


def _keystore_merge(data: bytes, loc: Locations, env: str) -> tuple[str | None, list[str], bool]:
    """An environment's keystore part against the live keystore: why it can never be merged
    here (not that environment's), or None; the keys of it that differ from live ones (they
    need replace); whether the live keystore already holds every key of it as it is."""
    header, files = decode_files(data, "keystore")
    if header.get("env") != env or "keystore.json" not in files:
        return f"the keystore part is not environment {env}'s alone: restore it by name, or its own backup", [], False
    path = loc.home / "keystore.json"
    if not os.path.lexists(path):
        return None, [], False  # a fresh host: the part's file is written as it is
    todo, clash = merge_plan(path, files["keystore.json"][0])
    return None, clash, not todo


def _audit_state(c: Any, parsed: Rows, physical: dict[str, str]) -> str:
    q = sqldump._q
    rows = [tuple(r) for r in parsed.get("events", ([], []))[1]]
    meta = {str(r[0]): str(r[1]) for r in parsed.get("meta", ([], []))[1]}
    have: list[tuple[Any, ...]] = []
    have_meta: dict[str, str] = {}
    if "events" in physical:
        sql = f"SELECT seq, event, leaf, head, sig FROM {q(physical['events'])} ORDER BY seq"  # noqa: S608 (names checked by _q)
        have = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in c.execute(sql)]
    if "meta" in physical:
        have_meta = {str(k): str(v) for k, v in c.execute(f"SELECT k, v FROM {q(physical['meta'])}")}  # noqa: S608 (names checked by _q)
    if not have and not have_meta:
        return "empty"
    if have[: len(rows)] == rows and all(have_meta.get(k) == v for k, v in meta.items()):
        return "same" if len(have) == len(rows) else "extends"
    if have == rows[: len(have)] and all(meta.get(k) == v for k, v in have_meta.items()):
        return "prefix"
    return "other"


def refusal(name: str, kind: str, data: bytes, loc: Locations, replace: bool, env: str | None = None) -> str | None:
    """Why restoring part ``name`` at ``loc`` would be refused, or None (module docstring)."""
    if env is not None and name in HOST_WIDE:
        return f"part {name} is the whole host's, not environment {env}'s: restore it only by naming it"
    if env is not None and name == "keystore":
        bad, clash, _ = _keystore_merge(data, loc, env)
        if bad is None and clash and not replace:
            return f"key {clash[0]} of the keystore differs from the backup's: restore with --replace"
        return bad
    if kind == "bao-snapshot":
        if loc.bao is None:
            return "no OpenBao to restore into: give its address (--bao-addr or BAO_ADDR)"
        return None if replace else "restoring OpenBao replaces the cluster's whole state: restore with --replace"
    if kind == "sql":
        if _target(name, loc) is None:
            return f"no {name} database to restore into: give the registry's --data or --db"
        scope = env if name == "governance" else None
        if replace:
            if scope is not None:
                _state(name, data, loc, scope)  # another environment's rows: tampered, even with replace
            return None
        state, _ = _state(name, data, loc, scope)
        if state in ("empty", "same", "prefix"):
            return None
        if scope is not None:
            return f"the {name} database holds other rows of {scope} than the backup's: restore with --replace"
        return f"the {name} database holds other data than the backup's: restore with --replace"
    if replace:
        return None
    if name == "ca":
        _, files = decode_files(data, name)
        dest = loc.home / "ca"
        if (dest.exists() or dest.is_symlink()) and not camerge.holds(dest, files):
            return f"{dest} differs from the backup's CA: restore with --replace"
        return None
    for dest, content in _files(name, data, loc):
        if _file_differs(dest, content):
            return f"{dest} differs from the backup's {name} part: restore with --replace"
    return None


def holds(name: str, kind: str, data: bytes, loc: Locations, env: str | None = None) -> bool:
    """Whether the target already holds part ``name`` (module docstring)."""
    if kind == "bao-snapshot":
        return False
    if env is not None and name == "keystore":
        bad, _, held = _keystore_merge(data, loc, env)
        return bad is None and held
    if kind == "sql":
        scope = env if name == "governance" else None
        return _target(name, loc) is not None and _state(name, data, loc, scope)[0] in ("same", "extends")
    if name == "ca":
        return camerge.holds(loc.home / "ca", decode_files(data, name)[1])
    for dest, content in _files(name, data, loc):
        try:
            if dest.read_bytes() != content:
                return False
        except OSError:
            return False
    return True


__all__ = ["holds", "refusal"]
