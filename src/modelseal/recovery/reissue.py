"""After a CA restore, services re-authenticate (docs/recovery.md, "Restores").

A restored CA is the CA as it was at the backup: every certificate it had issued then is
in its ``issued.json``, and whoever held one of their keys then (a copy of a certificate
folder, an attacker who took it since) could still use it. So each identity that had a live
certificate in the restored records (not expired, not on the restored denylist) gets a new
certificate and key from the restored CA (``pki.issue``, audited), and every one of those
old serials is then revoked (``pki.issue.revoke_all``: the denylist, and OpenBao's PKI for
``transit-pki``; renewals of them too). The new folders go under ``--reissue-dir``, named by
the SHA-256 of the identity (a name read from a backup never becomes a path), with
``reissued.json`` mapping each folder to its identity for the operator to deliver.

Server certificates come back with their identity only: ``issued.json`` does not keep DNS
or IP names, so a server's TLS names are re-issued by the operator (``cert issue --dns``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from modelseal.errors import ModelsealError
from modelseal.keys.service import KeyService
from modelseal.pki import denylist, identity, issue
from modelseal.pki.store import ca_dir
from modelseal.util.files import write_atomic

INDEX = "reissued.json"


def live_rows(folder: Path, now: float) -> list[dict[str, Any]]:
    """The restored records of certificates still valid at ``now`` and not denied."""
    listed = denylist.load(folder)
    out = []
    for row in _rows(folder):
        serial = row.get("serial")
        if not isinstance(serial, str) or issue.not_after_of(row) <= now:
            continue
        try:
            if listed.revoked(denylist.parse_serial(serial)):
                continue
        except ModelsealError:
            continue
        out.append(row)
    return out


def _rows(folder: Path) -> list[dict[str, Any]]:
    from modelseal.pki import store

    doc = store.read_json(folder, issue.ISSUED_FILE) or {"issued": []}
    rows = doc.get("issued") if isinstance(doc, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def folder_name(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def reissue_and_revoke(
    svc: KeyService, out: Path, backup_id: str, *, home: Path | None = None, now: float | None = None
) -> dict[str, Any]:
    """New certificates for every identity with a live certificate in the CA at ``home``'s
    ``ca/`` (default ``$MODELSEAL_HOME``), into ``out``; then every old serial revoked.
    Re-runnable: the index in ``out`` records, per backup, the identities re-issued and their
    new serials, so a second run issues only what is missing and never takes a certificate
    it issued itself for an old one."""
    folder = ca_dir(home)
    t = time.time() if now is None else now
    issuer = issue.load_issuer(svc, folder)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    index_path = out / INDEX
    index = _read_index(index_path, backup_id)
    fresh = {str(e.get("serial")) for e in index.values()}
    rows = [r for r in live_rows(folder, t) if str(r["serial"]) not in fresh]
    old = sorted({str(r["serial"]) for r in rows})
    identities = sorted({str(r.get("identity")) for r in rows})
    issued = skipped = 0
    for uri in identities:
        if uri in index:
            continue
        try:
            who = identity.parse(uri)
        except ModelsealError:
            skipped += 1
            continue
        new = issue.issue(svc, who, ca=issuer)
        name = folder_name(uri)
        issue.write_dir(new, out / name, force=True)
        index[uri] = {"folder": name, "serial": new.serial, "kind": who.kind}
        doc = {"backup": backup_id, "identities": index}
        write_atomic(index_path, json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n", mode=0o600)
        issued += 1
    reason = f"superseded: the CA was restored from backup {backup_id}"
    for serial in old:
        issue.revoke_all(svc, denylist.parse_serial(serial), reason, ca=issuer)
    return {"identities": len(index), "issued": issued, "skipped": skipped, "revoked": old}


def _read_index(path: Path, backup_id: str) -> dict[str, dict[str, Any]]:
    """This restore's index (our own file, written atomically); empty for another backup's."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("backup") != backup_id or not isinstance(doc.get("identities"), dict):
        return {}
    return {k: v for k, v in doc["identities"].items() if isinstance(v, dict)}


__all__ = ["INDEX", "folder_name", "live_rows", "reissue_and_revoke"]
