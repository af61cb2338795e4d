"""What a CA restore keeps of the live CA's records (docs/recovery.md, "Restores").

A CA restored from a backup knows the certificates it had issued and revoked *then*. The
live ``ca/``, where there still is one, knows two things more that must survive the
restore: revocations made since (putting the backup's ``revoked.json`` back would take a
serial revoked after the backup, a stolen key's, off the denylist) and certificates
issued since (valid under the restored root, unknown to the restored records, so nothing
would re-issue or revoke them). So ``merged`` makes the staged folder's records the union
of both: ``revoked.json`` holds every serial either denylist holds (the live entry kept
for a serial the backup does not list), ``issued.json`` the backup's rows plus every live
row of a serial the backup does not hold. The re-authentication after the restore
(``recovery.reissue``) then re-issues those identities and revokes those serials too. The
merge only adds: no serial leaves the denylist, a live row only adds a certificate to
revoke. Without a live ``ca/``, or with a record that cannot be read (the live one, or the
backup's own: then it is restored as it is), what was revoked after the backup cannot be
known: ``live`` says ``absent`` or ``unreadable`` and the restore report warns.

``holds(folder, files)``: the folder already holds the backup's CA (every other file byte
for byte, the same file names, and records that list at least the backup's serials that
have not expired; a backup record that does not parse, byte for byte too; no record there
that does not parse): a restore there has nothing to do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelseal.errors import ModelsealError
from modelseal.pki import denylist, store
from modelseal.pki.issue import ISSUED_FILE
from modelseal.recovery.parts import CA_FILE
from modelseal.util.bounded import json_loads

REVOKED_FILE = denylist.FILE
RECORDS = {REVOKED_FILE: "revoked", ISSUED_FILE: "issued"}
Files = dict[str, tuple[bytes, int]]


def _rows(data: bytes, name: str) -> dict[str, dict[str, Any]]:
    """The rows of a record file keyed by the serial's canonical hex; ValueError if malformed."""

    def bad(_why: str) -> ValueError:
        return ValueError(name)

    doc = json_loads(data, max_depth=4, max_values=2_000_000, error=bad)
    rows = doc.get(RECORDS[name]) if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise ValueError(name)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError(name)
        serial = denylist.serial_hex(denylist.parse_serial(str(row.get("serial"))))
        out.setdefault(serial, row)
    return out


def _backup_rows(files: Files, name: str) -> dict[str, dict[str, Any]] | None:
    """The backup's rows (empty if it has no such file); None if its file does not parse."""
    if name not in files:
        return {}
    try:
        return _rows(files[name][0], name)
    except ValueError:
        return None


def _live_rows(folder: Path, name: str) -> dict[str, dict[str, Any]] | None:
    """The live folder's rows (empty if the file is missing); None if it cannot be read."""
    try:
        data = store.read(folder, name)
        return {} if data is None else _rows(data, name)
    except (ModelsealError, OSError, ValueError):
        return None


def _revoked_at(row: dict[str, Any]) -> float:
    value = row.get("revoked_at")
    return float(value) if isinstance(value, int | float) else 0.0


def _current(row: dict[str, Any], now: float) -> bool:
    """Whether the CA still keeps ``row`` (both record files drop a row a day after expiry)."""
    na = row.get("not_after")
    return not isinstance(na, int | float) or isinstance(na, bool) or na + denylist.GRACE > now


def holds(folder: Path, files: Files, now: float | None = None) -> bool:
    """Whether ``folder`` already holds the backup's CA ``files`` (module docstring)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    t = time.time() if now is None else now
    present = {p.name for p in folder.iterdir() if CA_FILE.fullmatch(p.name)}
    if present - set(RECORDS) != set(files) - set(RECORDS):
        return False
    for name in present & set(RECORDS):
        if _live_rows(folder, name) is None and (name not in files or _backup_rows(files, name) is not None):
            return False  # a damaged record (not the backup's own bytes): the restore has work to do
    for name, (data, _mode) in files.items():
        mine = _backup_rows(files, name) if name in RECORDS else None
        if mine is not None:
            live = _live_rows(folder, name) if name in present else None
            want = {s for s, row in mine.items() if _current(row, t)}
            if live is None or not want <= set(live):
                return False
            continue
        try:
            if (folder / name).read_bytes() != data:
                return False
        except OSError:
            return False
    return True


def merged(folder: Path, files: Files) -> tuple[Files, dict[str, Any]]:
    """The backup's CA ``files`` with the live ``folder``'s later records added (module
    docstring), and what was found: ``live`` (``merged``, ``absent``, ``unreadable``),
    ``later_revocations`` and ``later_certificates`` (counts of serials the backup lacks)."""
    out = dict(files)
    if not folder.is_dir() or folder.is_symlink():
        return out, {"live": "absent", "later_revocations": None, "later_certificates": None}
    info: dict[str, Any] = {"live": "merged"}
    unreadable = []
    for name, count in ((REVOKED_FILE, "later_revocations"), (ISSUED_FILE, "later_certificates")):
        live = _live_rows(folder, name)
        if live is None:
            unreadable.append(f"live {name}")
            info[count] = None
            continue
        mine = _backup_rows(files, name)
        if mine is None:  # the backup's own record does not parse: nothing to merge it with
            unreadable.append(f"backup's {name}")
            info[count] = None
            continue
        later = [row for serial, row in live.items() if serial not in mine]
        info[count] = len(later)
        if not later:
            continue
        rows = [*mine.values(), *later]
        if name == REVOKED_FILE:
            rows.sort(key=_revoked_at)
        mode = files[name][1] if name in files else 0o600
        out[name] = (store.dump_json({RECORDS[name]: rows}), mode)
    if unreadable:
        info["live"] = "unreadable"
        info["unreadable"] = unreadable
    return out, info


@contextlib.contextmanager
def live_records_locked(folder: Path) -> Iterator[None]:
    """The live CA's record lock held (``pki.denylist.locked``), if there is a live folder:
    a revocation or renewal waits until the restored folder is in place."""
    if folder.is_dir() and not folder.is_symlink():
        with denylist.locked(folder):
            yield
    else:
        yield


__all__ = ["holds", "live_records_locked", "merged"]
