"""Before a restore writes anything: every refusal that can be predicted, and whether a
target already holds a part (docs/recovery.md, "Restores").

``refusal(name, kind, data, loc, replace)`` is the one-line reason ``restoreparts.restore_part``
would refuse part ``name`` at ``loc``, or None: a SQL part with no database to go to, or
whose database holds other rows (the audit log: rows that are not a prefix of the
backup's) without ``replace``; a files part over files that differ (the version records
excepted: they are merged), or a CA folder that does not hold the backup's CA, without
``replace``; an OpenBao part without an OpenBao to go to, or without ``replace``.
``run_restore`` asks it of every selected part before the first write, so a predictable
refusal leaves the host untouched instead of half restored.

``holds(name, kind, data, loc)``: whether the target already holds the part (the files
byte for byte, the CA by ``recovery.camerge.holds``, the SQL tables row for row, the
audit log when it *starts with* the backup's entries: events appended since are kept; an
OpenBao cluster never: its state cannot be compared). A resumed restore verifies each
part its journal says is done this way, and restores again any that is not.

Reads only: SQLite is opened ``mode=ro`` (a missing file is an empty target), PostgreSQL
in a read-only transaction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelseal.recovery import camerge, sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.partcodec import decode_files
from modelseal.recovery.parts import VERSION_RECORDS, audit_key_folder

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


def _state(name: str, data: bytes, loc: Locations) -> tuple[str, Rows]:
    """How the SQL target of part ``name`` relates to its dump: ``empty``, ``same``, ``prefix``
    (the audit log: a start of the backup's, the rest to append), ``extends`` (the audit log:
    the backup's entries and more), or ``other``."""
    parsed = sqldump.parse(data, name, name)
    target = _target(name, loc)
    assert target is not None
    dialect, where = target
    if dialect == "sqlite" and not Path(where).is_file():
        return "empty", parsed
    conn = sqldump._Conn(dialect, where, readonly=True)
    try:
        with conn.transaction(write=False) as c:
            present = c.existing()
            physical = {t: p for t, p in sqldump.tables(name, dialect).items() if p in present}
            if name == "audit":
                return _audit_state(c, parsed, physical), parsed
            q = sqldump._q
            if not any(c.execute(f"SELECT 1 FROM {q(p)} LIMIT 1").fetchone() for p in physical.values()):  # noqa: S608 (names checked by _q)
                return "empty", parsed
            if any(rows for t, (_, rows) in parsed.items() if t not in physical):
                return "other", parsed
            return ("same" if sqldump._holds_exactly(c, parsed, physical) else "other"), parsed
    finally:
        conn.close()


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


def refusal(name: str, kind: str, data: bytes, loc: Locations, replace: bool) -> str | None:
    """Why restoring part ``name`` at ``loc`` would be refused, or None (module docstring)."""
    if kind == "bao-snapshot":
        if loc.bao is None:
            return "no OpenBao to restore into: give its address (--bao-addr or BAO_ADDR)"
        return None if replace else "restoring OpenBao replaces the cluster's whole state: restore with --replace"
    if kind == "sql":
        if _target(name, loc) is None:
            return f"no {name} database to restore into: give the registry's --data or --db"
        if replace:
            return None
        state, _ = _state(name, data, loc)
        if state in ("empty", "same", "prefix"):
            return None
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


def holds(name: str, kind: str, data: bytes, loc: Locations) -> bool:
    """Whether the target already holds part ``name`` (module docstring)."""
    if kind == "bao-snapshot":
        return False
    if kind == "sql":
        return _target(name, loc) is not None and _state(name, data, loc)[0] in ("same", "extends")
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
