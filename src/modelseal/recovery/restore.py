"""``modelseal backup restore``: a real restore, one compartment at a time (docs/recovery.md,
"Restores").

A restore takes either named components (``--component keystore --component ca``: parts
of ``recovery.parts.PART_NAMES``) or one environment (``--env prod``: every part of a backup
*made for that environment*, ``backup create --env prod``, which holds no other
environment's keys; a whole-host backup is not cut up at restore time). Nothing is written
before the manifest has verified and every selected part has been unsealed into memory and
parsed: a part sealed under a key this restorer cannot reach, a tampered or malformed part,
stops the restore with nothing touched (``BackupError``, ``BackupTampered``).

Then each part goes back through ``recovery.restoreparts.restore_part`` (each atomic: a
file or folder swap, one SQL transaction, a snapshot-force), in a fixed order, with a small
journal in the home (``restore-journal.json``, written atomically after each part): an
interrupted restore run again with the same backup and selection skips the parts already
done and finishes; a journal of another backup or selection is refused until the operator
finishes or deletes it. After a CA restore, services re-authenticate (``recovery.reissue``).
A signed record goes into ``evidence/restores/`` with its ``backup-restore`` audit event
(``records``), result ``ok`` or the error class name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditSink
from modelseal.errors import BackupError, BackupTampered, ModelsealError
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.recovery import drillenv, partcodec, records, reissue, sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.parts import PART_NAMES
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited, write_atomic

JOURNAL = "restore-journal.json"
JOURNAL_FORMAT = "modelseal-restore-journal/v1"
_GZIP = b"\x1f\x8b"


@dataclass(frozen=True)
class RestoreRequest:
    source: str
    backup_id: str | None = None
    components: tuple[str, ...] = ()
    env: str | None = None
    replace: bool = False
    reissue_dir: Path | None = None
    recovery_shares: tuple[Path, ...] = ()
    signer_keys: tuple[str, ...] = ()


def _selection(req: RestoreRequest, manifest: Any) -> list[Any]:
    """The manifest entries to restore, in ``PART_NAMES`` order."""
    if bool(req.components) == (req.env is not None):
        raise BackupError("restore either --component NAME ... or one --env ENV")
    held = {e.name: e for e in manifest.parts}
    if req.env is not None:
        if manifest.env != req.env:
            what = f"environment {manifest.env}" if manifest.env else "the whole host"
            raise BackupError(
                f"backup {manifest.id} is a backup of {what}, not of environment {req.env}:"
                f" restore a backup made with --env {req.env}, or name the components"
            )
        names = list(held)
    else:
        unknown = [c for c in req.components if c not in PART_NAMES]
        if unknown:
            raise BackupError(f"no component {unknown[0][:40]!r}: the components are {', '.join(PART_NAMES)}")
        missing = [c for c in req.components if c not in held]
        if missing:
            raise BackupError(f"backup {manifest.id} holds no {missing[0]} part")
        names = list(dict.fromkeys(req.components))
    return [held[n] for n in PART_NAMES if n in names]


def precheck(name: str, kind: str, data: bytes) -> None:
    """Parse a part fully before anything is written (``BackupTampered`` if malformed)."""
    if kind == "files":
        partcodec.decode_files(data, name)
    elif kind == "sql":
        sqldump.parse(data, name, name)
    elif kind == "bao-snapshot":
        if not data.startswith(_GZIP):
            raise BackupTampered(f"backup part {name} is not an OpenBao snapshot")
    else:
        raise BackupTampered(f"backup part {name} is of an unknown kind")


def _journal_path(loc: Locations) -> Path:
    return loc.home / JOURNAL


def _read_journal(path: Path) -> dict[str, Any] | None:
    try:
        raw = read_limited(path, 1 << 20, BackupError, str(path), regular=True)
    except FileNotFoundError:
        return None
    doc = json_loads(raw, max_depth=4, max_values=4096, error=lambda _why: BackupError(f"{path} is damaged"))
    if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT or not isinstance(doc.get("done"), list):
        raise BackupError(f"{path} is not a restore journal: remove it")
    return doc


def _write_journal(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n", mode=0o600)


def _resume(path: Path, manifest: Any, names: list[str]) -> dict[str, Any]:
    found = _read_journal(path)
    fresh = {"format": JOURNAL_FORMAT, "backup": manifest.id, "parts": names, "done": [], "reissued": False}
    if found is None:
        return fresh
    if found.get("backup") != manifest.id or found.get("parts") != names:
        raise BackupError(
            f"an unfinished restore of backup {str(found.get('backup'))[:80]} ({found.get('parts')}) is recorded in"
            f" {path}: run that restore again to finish it, or delete the journal to abandon it"
        )
    return {**fresh, "done": [n for n in found["done"] if n in names], "reissued": found.get("reissued") is True}


def _apply(
    req: RestoreRequest,
    loc: Locations,
    svc: KeyService,
    manifest: Any,
    entries: list[Any],
    parts: dict[str, bytes],
    journal: dict[str, Any],
    restore: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    path = _journal_path(loc)
    counts: dict[str, Any] = {}
    _write_journal(path, journal)
    for e in entries:
        if e.name in journal["done"]:
            counts[e.name] = "done before"
            continue
        counts[e.name] = restore(e.name, e.kind, parts.pop(e.name), loc, replace=req.replace)
        journal["done"].append(e.name)
        _write_journal(path, journal)
        if e.name == "keystore":
            keystore.clear_cache()  # this process must not keep unwrapping with the old table
    out: dict[str, Any] = {"parts": counts}
    if any(e.name == "ca" for e in entries) and req.reissue_dir is not None:
        out["reissue"] = reissue.reissue_and_revoke(svc, req.reissue_dir, manifest.id, home=loc.home)
        journal["reissued"] = True
        _write_journal(path, journal)
    path.unlink(missing_ok=True)
    return out


def run_restore(
    req: RestoreRequest,
    loc: Locations,
    svc: KeyService,
    sink: AuditSink,
    *,
    now: Callable[[], float] = time.time,
    restore: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The restore of the module docstring; the report (also the record's body)."""
    from modelseal.recovery.restoreparts import restore_part
    from modelseal.recovery.sealing import load_verified

    started = now()
    report: dict[str, Any] = {"source": req.source, "started": started, "replace": req.replace}
    unlocked: list[str] = []
    result = "ok"
    store = None
    try:
        store, manifest = load_verified(req.source, req.backup_id, signer_keys=req.signer_keys, home=loc.home)
        report["backup"] = {"id": manifest.id, "sequence": manifest.sequence, "created": manifest.created}
        report["backup"].update(env=manifest.env, host=manifest.host)
        entries = _selection(req, manifest)
        report["selected"] = [e.name for e in entries]
        if any(e.name == "ca" for e in entries) and req.reissue_dir is None:
            raise BackupError("a CA restore re-issues the certificates it had issued: give --reissue-dir DIR")
        journal = _resume(_journal_path(loc), manifest, report["selected"])
        report["resumed"] = bool(journal["done"])
        todo = [e for e in entries if e.name not in journal["done"]]
        parts, report["keys"] = drillenv.unseal_parts(store, manifest, todo, svc, req.recovery_shares, unlocked)
        for e in todo:
            precheck(e.name, e.kind, parts[e.name])
        report.update(_apply(req, loc, svc, manifest, entries, parts, journal, restore or restore_part))
    except BaseException as e:  # an interrupted restore is recorded as such, never as ok
        result = type(e).__name__
        report["error"] = f"{type(e).__name__}: {str(e)[:300]}" if isinstance(e, ModelsealError) else result
        raise
    finally:
        if store is not None:
            store.close()
        drillenv.forget_recovery(unlocked, svc)
        report["finished"] = now()
        report["result"] = result
        path: Path | None
        try:
            path, digest = records.write_record(records.RESTORE, report, loc.home, sink, result=result, started=started)
        except ModelsealError:
            if result == "ok":
                raise
            path, digest = None, ""  # the restore's own error is the one to report
        report["record"], report["record_sha256"] = str(path) if path else None, digest
    return report


__all__ = ["JOURNAL", "RestoreRequest", "precheck", "run_restore"]
