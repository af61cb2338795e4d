"""``modelseal backup restore``: a real restore, one compartment at a time (docs/recovery.md,
"Restores").

A restore takes named components (``--component keystore --component ca``: parts of
``recovery.parts.PART_NAMES``), or one environment (``--env prod``), from a backup *made for
that environment* (``backup create --env prod``, which holds no other environment's keys; a
whole-host backup is not cut up at restore time). An environment's restore goes into the
live host beside the other environments (``restore_part(..., env=manifest.env)``): its keys
are merged into the live keystore, its governance rows replace that environment's rows only;
the parts of the whole host the backup also holds (``restoreparts.HOST_WIDE``: config,
registry, audit) are left out unless named with ``--component``, and those are then restored
whole, as in a restore by components. With ``--component``, ``--env`` restores the named
parts only (the environment's merged, the host-wide whole). Nothing is written
before the manifest has verified and every selected part has been unsealed into memory and
parsed: a part sealed under a key this restorer cannot reach, a tampered or malformed part,
stops the restore with nothing touched (``BackupError``, ``BackupTampered``).

Nor before every refusal that can be predicted has been ruled out for every selected part
(``recovery.restorecheck.refusal``, under the same environment rules: a database that holds
other rows, files that differ, a keystore key that differs, OpenBao, without ``--replace``; a
part with nowhere to go), so a restore is not left half applied by a refusal of its second
part.

Then each part goes back through ``recovery.restoreparts.restore_part`` (each atomic: a
file or folder swap, one SQL transaction, a snapshot-force), in a fixed order, with a small
journal in the home (``restore-journal.json``, written atomically after each part; each
done part recorded with the SHA-256 the signed manifest gives its sealed file). An
interrupted restore run again with the same backup and selection resumes: a part the
journal says is done, under the manifest's digest, is checked against its target
(``restorecheck.holds``) and restored again unless the target holds it, so an edited or
planted journal never makes a part count as restored. A journal of another backup or
selection is refused until the operator finishes or deletes it. After a CA restore,
services re-authenticate (``recovery.reissue``); the live CA's later revocations and
certificates are kept (``recovery.camerge``), and without a live CA the report warns that
they cannot be known. A signed record goes into ``evidence/restores/`` with its
``backup-restore`` audit event (``records``), result ``ok`` or the error class name; it
names the resumed parts and how each was found.
"""

from __future__ import annotations

import hmac
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
from modelseal.recovery import drillenv, partcodec, records, reissue, restorecheck, sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.parts import PART_NAMES
from modelseal.recovery.restoreparts import HOST_WIDE
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited, write_atomic

JOURNAL = "restore-journal.json"
JOURNAL_FORMAT = "modelseal-restore-journal/v2"
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
    """The manifest entries to restore, in ``PART_NAMES`` order (module docstring)."""
    if not req.components and req.env is None:
        raise BackupError("restore --component NAME ..., or one --env ENV")
    held = {e.name: e for e in manifest.parts}
    if req.env is not None and manifest.env != req.env:
        what = f"environment {manifest.env}" if manifest.env else "the whole host"
        raise BackupError(
            f"backup {manifest.id} is a backup of {what}, not of environment {req.env}:"
            f" restore a backup made with --env {req.env}, or name the components"
        )
    unknown = [c for c in req.components if c not in PART_NAMES]
    if unknown:
        raise BackupError(f"no component {unknown[0][:40]!r}: the components are {', '.join(PART_NAMES)}")
    missing = [c for c in req.components if c not in held]
    if missing:
        raise BackupError(f"backup {manifest.id} holds no {missing[0]} part")
    names = set(req.components) if req.components else set(held) - set(HOST_WIDE)
    if not names:
        raise BackupError(
            f"backup {manifest.id} holds no part of environment {req.env} alone: name the host's parts"
            f" ({', '.join(n for n in HOST_WIDE if n in held)}) with --component"
        )
    return [held[n] for n in PART_NAMES if n in names]


def scope(req: RestoreRequest, name: str) -> str | None:
    """The environment part ``name`` is restored for: the restore's, but None for a part of
    the whole host (``HOST_WIDE``), which is restored whole when named."""
    return req.env if name not in HOST_WIDE else None


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
    done = doc.get("done") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != JOURNAL_FORMAT
        or not isinstance(done, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in done.items())
    ):
        raise BackupError(f"{path} is not a restore journal: remove it")
    return doc


def _write_journal(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n", mode=0o600)


def _resume(path: Path, manifest: Any, entries: list[Any]) -> dict[str, Any]:
    """The journal to go on with: a fresh one, or the unfinished one of this very restore,
    keeping as done only the parts it names with the digest the signed manifest gives them."""
    names = [e.name for e in entries]
    found = _read_journal(path)
    fresh: dict[str, Any] = {"format": JOURNAL_FORMAT, "backup": manifest.id, "parts": names, "done": {}}
    if found is None:
        return fresh
    if found.get("backup") != manifest.id or found.get("parts") != names:
        raise BackupError(
            f"an unfinished restore of backup {str(found.get('backup'))[:80]} ({found.get('parts')}) is recorded in"
            f" {path}: run that restore again to finish it, or delete the journal to abandon it"
        )
    done = {
        e.name: e.sha256
        for e in entries
        if isinstance(found["done"].get(e.name), str) and hmac.compare_digest(found["done"][e.name], e.sha256)
    }
    return {**fresh, "done": done}


def _ca_warnings(counts: dict[str, Any]) -> list[str]:
    live = counts.get("live")
    if live == "absent":
        return [
            "no live ca/ was there to merge: certificates revoked after the backup cannot be known and are"
            " not on the restored denylist, nor are certificates issued after it: revoke them again (cert revoke)"
        ]
    if live == "unreadable":
        which = ", ".join(str(n) for n in counts.get("unreadable", []))
        return [
            f"the {which} could not be read: what the live CA recorded after the backup (revocations,"
            " certificates) cannot be known from it and is not kept: revoke them again (cert revoke)"
        ]
    return []


def _apply(
    req: RestoreRequest,
    loc: Locations,
    svc: KeyService,
    manifest: Any,
    entries: list[Any],
    parts: dict[str, bytes],
    plan: tuple[dict[str, Any], dict[str, bool]],
    restore: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    journal, held = plan
    path = _journal_path(loc)
    counts: dict[str, Any] = {}
    warnings: list[str] = []
    _write_journal(path, journal)
    for e in entries:
        data = parts.pop(e.name)
        if held.get(e.name):
            counts[e.name] = {"resumed": "verified"}  # done before, and the target holds it
            continue
        got = restore(e.name, e.kind, data, loc, replace=req.replace, env=scope(req, e.name))
        counts[e.name] = {**got, "resumed": "restored again"} if e.name in journal["done"] else got
        journal["done"][e.name] = e.sha256
        _write_journal(path, journal)
        if e.name == "keystore":
            keystore.clear_cache()  # this process must not keep unwrapping with the old table
        if e.name == "ca":
            warnings += _ca_warnings(got)
    out: dict[str, Any] = {"parts": counts}
    if warnings:
        out["warnings"] = warnings
    if any(e.name == "ca" for e in entries) and req.reissue_dir is not None:
        out["reissue"] = reissue.reissue_and_revoke(svc, req.reissue_dir, manifest.id, home=loc.home)
    path.unlink(missing_ok=True)
    return out


def _plan(
    req: RestoreRequest, loc: Locations, entries: list[Any], parts: dict[str, bytes], journal: dict[str, Any]
) -> dict[str, bool]:
    """Every part parsed, the journal's done parts checked against their targets, and every
    predictable refusal raised, all before the first write; which done parts are held."""
    for e in entries:
        precheck(e.name, e.kind, parts[e.name])
    done = [e for e in entries if e.name in journal["done"]]
    held = {e.name: restorecheck.holds(e.name, e.kind, parts[e.name], loc, scope(req, e.name)) for e in done}
    for e in entries:
        if not held.get(e.name):
            why = restorecheck.refusal(e.name, e.kind, parts[e.name], loc, req.replace, scope(req, e.name))
            if why is not None:
                raise BackupError(why)
    return held


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
    report: dict[str, Any] = {"source": req.source, "started": started, "replace": req.replace, "env": req.env}
    unlocked: list[str] = []
    result = "ok"
    store = None
    try:
        store, manifest = load_verified(req.source, req.backup_id, signer_keys=req.signer_keys, home=loc.home)
        report["backup"] = {"id": manifest.id, "sequence": manifest.sequence, "created": manifest.created}
        report["backup"].update(env=manifest.env, host=manifest.host, signer_key=manifest.signer)
        entries = _selection(req, manifest)
        report["selected"] = [e.name for e in entries]
        if any(e.name == "ca" for e in entries) and req.reissue_dir is None:
            raise BackupError("a CA restore re-issues the certificates it had issued: give --reissue-dir DIR")
        journal = _resume(_journal_path(loc), manifest, entries)
        report["resumed"] = sorted(journal["done"])
        parts, report["keys"] = drillenv.unseal_parts(store, manifest, entries, svc, req.recovery_shares, unlocked)
        held = _plan(req, loc, entries, parts, journal)
        report.update(_apply(req, loc, svc, manifest, entries, parts, (journal, held), restore or restore_part))
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


__all__ = ["JOURNAL", "RestoreRequest", "precheck", "run_restore", "scope"]
