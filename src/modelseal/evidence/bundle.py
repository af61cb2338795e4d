"""``evidence export``: gather every section for a window, index it against the controls,
render the report, and write the signed bundle into a fresh folder (docs/evidence.md).

The folder is built under a fresh temporary name beside ``out`` and renamed into place only
once every file, the manifest and its signature are written and fsynced, with
``renameat2(RENAME_NOREPLACE)`` (else a rename that cannot land on a non-empty folder):
never over anything, no swap and no crash recovery that would move a folder found beside
``out`` into place. ``out`` must not exist, and a failure or a crash leaves nothing at
``out`` (at worst a hidden temporary folder, which holds no signature until its last step). The manifest lists
every file in the bundle's one order with its SHA-256 and size; ``manifest.sig`` is the host
audit key's Ed25519 signature over ``model.DOMAIN || manifest.json``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelseal.audit.hosts import key_id
from modelseal.audit.log import MerkleAuditLog, public_key_hex
from modelseal.errors import EvidenceError
from modelseal.evidence import auditproof, certs, govern, keyinv, records, report
from modelseal.evidence.controls import NONE, UNVERIFIED, build_index
from modelseal.evidence.model import (
    BUNDLE_FORMAT,
    DOMAIN,
    INDEX,
    MANIFEST,
    MANIFEST_FORMAT,
    REPORT,
    SECTIONS,
    SIGNATURE,
    SIGNATURE_FORMAT,
    Section,
    Window,
    canonical,
    event_entry,
    file_order,
    section_file,
)
from modelseal.keys.service import KeyService
from modelseal.util.files import RENAME_NOREPLACE, fsync_dir, remove_path, renameat2, temp_sibling, write_new

SECURITY_OPS = frozenset({"anomaly", "pin-mismatch", "mfa-replay", "content-refused"})


@dataclass(frozen=True)
class Sources:
    """Where this host's state lives. ``audit``: ``MODELSEAL_AUDIT_URL`` or ``home/audit.db``;
    ``governance``: a ``governance.store.open_target`` (None: no server here); ``tls_reports``:
    ``modelseal scan --json`` documents (``records.parse_tls_report``)."""

    home: Path
    audit: str | Path
    governance: str | None = None
    tls_reports: tuple[dict[str, Any], ...] = ()
    witness: Path | None = None


@dataclass(frozen=True)
class Exported:
    folder: Path
    files: int
    proofs: int
    audit_ok: bool
    audit_reason: str
    without_evidence: tuple[str, ...]  # control refs with no evidence in the window
    gaps: tuple[str, ...]
    unverified: tuple[str, ...] = ()  # control refs with only failing or unverified entries


def _audit_section(view: auditproof.AuditView, events: list[dict[str, Any]]) -> Section:
    s = Section("audit")
    th = view.tree_head
    s.add(
        "audit.verification",
        {
            **view.verification,
            "tree_head_size": None if th is None else th["size"],
            "tree_head_key_id": None if th is None else th["key_id"],
        },
    )
    if not view.verification.get("ok"):
        s.note("audit.verification", f"the audit log does not verify: {view.verification.get('reason')}")
    if th is None:
        s.gaps.append("no signed tree head: the audit log is empty, missing, or has no entry signed by a trusted key")
    for e in events:
        if e.get("operation") in SECURITY_OPS:
            s.add("audit.security_events", event_entry(e))
    return s


def gather(
    window: Window, src: Sources, svc: KeyService, now: float, host: str, signer: Ed25519PublicKey
) -> tuple[dict[str, Any], dict[str, Section], dict[str, bytes]]:
    """The index, the sections and the record copies."""
    view = auditproof.load(src.audit, src.witness, now)
    events = [e for e in view.events if window.contains(auditproof.event_time(e))]
    trusted = MerkleAuditLog(src.audit).trusted_keys()
    access, changes = govern.gather(src.governance, src.home, window, events, now, view.events)
    recovery, copies = records.gather(src.home, window, events, trusted, view.events)
    sections = {
        "keys": keyinv.gather(svc, window, events, keystore=(src.home / "keystore.json").is_file(), now=now),
        "certificates": certs.gather(src.home / "ca", window, events, now),
        "access": access,
        "changes": changes,
        "tls": records.tls_section(list(src.tls_reports)),
        "recovery": recovery,
        "audit": _audit_section(view, events),
    }
    cited = set().union(*(s.cited for s in sections.values()))
    proofs = view.proofs(cited)
    sections["audit"].extra = {"tree_head": view.tree_head, "proofs": proofs}
    v = view.verification
    index = {
        "format": BUNDLE_FORMAT,
        "window": window.to_json(),
        "generated": now,
        "host": host,
        "signer_public_key": public_key_hex(signer),
        "signer_key_id": key_id(signer),
        "audit": {k: v.get(k) for k in ("ok", "entries", "reason", "proven_size", "witness_checkpoint")},
        "controls": build_index(sections, window),
        "gaps": [f"{name}: {g}" for name, s in sections.items() for g in s.gaps],
        "events_in_window": len(events),
        "events_cited": len(proofs),
    }
    return index, sections, copies


def export(
    out: Path, window: Window, src: Sources, svc: KeyService, *, now: float | None = None, host: str | None = None
) -> Exported:
    """Write the bundle for ``window`` into the new folder ``out``."""
    t = time.time() if now is None else now
    if out.exists() or out.is_symlink():
        raise EvidenceError(f"{out} already exists: an evidence bundle goes into a new folder")
    if not out.parent.is_dir():
        raise EvidenceError(f"folder {out.parent} does not exist")
    signing = MerkleAuditLog(src.audit).signing_key
    try:
        files, order, index, sections = _render(window, src, svc, t, host or socket.gethostname(), signing)
    except UnicodeError:
        raise EvidenceError("the gathered data holds text that cannot be encoded: the bundle was not written") from None
    raw = files.pop(MANIFEST)
    sig = canonical({"format": SIGNATURE_FORMAT, "signature": signing.sign(DOMAIN + raw).hex()})
    tmp = temp_sibling(out)
    try:
        tmp.mkdir(mode=0o700)
        try:
            for name in order:
                _write(tmp, name, files[name])
            _write(tmp, MANIFEST, raw)
            _write(tmp, SIGNATURE, sig)  # last: a folder without it never verifies
            fsync_dir(tmp)
            _commit(tmp, out)
        except BaseException:
            remove_path(tmp)
            raise
    except FileExistsError:
        raise EvidenceError(f"{out} already exists: an evidence bundle goes into a new folder") from None
    except OSError as e:
        raise EvidenceError(f"cannot write the evidence bundle {out}: {e.strerror}") from None
    status = {f"{c['framework']} {c['ref']}": c["status"] for c in index["controls"]}
    v = index["audit"]
    return Exported(
        out,
        len(order),
        len(sections["audit"].extra["proofs"]),
        bool(v["ok"]),
        str(v["reason"] or ""),
        tuple(ref for ref, st in status.items() if st == NONE),
        tuple(index["gaps"]),
        tuple(ref for ref, st in status.items() if st == UNVERIFIED),
    )


def _render(
    window: Window, src: Sources, svc: KeyService, t: float, host: str, signing: Ed25519PrivateKey
) -> tuple[dict[str, bytes], list[str], dict[str, Any], dict[str, Section]]:
    """Every file's bytes (the manifest's included), in the bundle's order."""
    index, sections, copies = gather(window, src, svc, t, host, signing.public_key())
    files: dict[str, bytes] = {INDEX: canonical(index)}
    docs = {name: s.to_json(window) for name, s in sections.items()}
    for name in SECTIONS:
        files[section_file(name)] = canonical(docs[name])
    files.update(copies)
    files[REPORT] = report.render(index, docs)
    order = file_order(list(copies))
    manifest = {
        "format": MANIFEST_FORMAT,
        "bundle": BUNDLE_FORMAT,
        "window": window.to_json(),
        "generated": t,
        "host": index["host"],
        "signer": index["signer_public_key"],
        "signer_key_id": key_id(signing.public_key()),
        "files": [{"name": n, "sha256": hashlib.sha256(files[n]).hexdigest(), "size": len(files[n])} for n in order],
    }
    files[MANIFEST] = canonical(manifest)
    return files, order, index, sections


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished folder to ``out``, never over anything: no swap, nothing moved aside."""
    if os.path.lexists(out):
        raise FileExistsError(out)
    if not renameat2(tmp, out, RENAME_NOREPLACE):
        os.rename(tmp, out)  # where renameat2 is missing: fails onto a file or a non-empty folder
    fsync_dir(out.parent)


def _write(root: Path, name: str, data: bytes) -> None:
    path = root / name
    folder = root
    for part in Path(name).parts[:-1]:  # records/KIND/: each level 0700, made once
        if not (folder / part).is_dir():
            (folder / part).mkdir(mode=0o700)
            fsync_dir(folder)
        folder = folder / part
    write_new(path, data, 0o600)
    if folder != root:
        fsync_dir(folder)


__all__ = ["Exported", "Sources", "export", "gather"]
