"""``inspect``: describe a sealed artifact from its public header, never a secret.

With ``contents=True`` it unwraps the key and adds the encrypted metadata (names,
sizes, digests); without, it says which recipient fields are unauthenticated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelseal.errors import VerificationError
from modelseal.format.envelope import artifact_id, decrypt_metadata, parse_slots
from modelseal.format.file import RawArtifact, open_keys, parse_json_object
from modelseal.format.folder import BLOB_DIR, read_manifest
from modelseal.format.header import KIND_BLOB, KIND_FILE, KIND_MANIFEST, Slot
from modelseal.format.reader import SealedReader
from modelseal.keys.service import KeyService
from modelseal.recipes.context import service, unwrapper
from modelseal.recipes.opening import open_raw, primary_file
from modelseal.signing.sigfile import SignatureFile, signature_path


def inspect(path: str | os.PathLike[str], *, contents: bool = False, keys: KeyService | None = None) -> dict[str, Any]:
    """Describe a sealed artifact from its public header. Never includes secrets.

    With ``contents=True`` the data key is unwrapped and the encrypted
    metadata (file names, sizes, digests) is added.
    """
    p = Path(path)
    src, raw = open_raw(primary_file(p))
    try:
        core = raw.core
        slots = parse_slots(raw.slots)
        info: dict[str, Any] = {
            "path": str(p),
            "type": {KIND_FILE: "file", KIND_MANIFEST: "folder", KIND_BLOB: "folder-blob"}[core.kind],
            "format_version": 1,
            "suite": core.suite,
            "artifact_id": artifact_id(core.binding),
            "chunk_size": core.chunk_size,
            ("sealed_length" if core.kind == KIND_FILE else "manifest_length"): raw.layout.file_length,
            "context": dict(core.context),
        }
        active = slots[0] if slots else None  # newest well-formed slot: not yet authenticated
        authenticated = False
        opened = None
        if contents and core.kind != KIND_BLOB:
            opened = open_keys(raw, unwrapper(service(keys), raw), src)
            active, authenticated = (opened.slot_index, opened.slot), True
        if core.slot_size:
            info.update(_slot_report(raw, active, authenticated))
        if core.kind == KIND_FILE:
            info["plaintext_length"] = core.plaintext_length
        if core.kind == KIND_MANIFEST:
            blob_dir = p / BLOB_DIR
            info["blobs"] = len(list(blob_dir.iterdir())) if blob_dir.is_dir() else 0
        info["signatures"] = _signature_report(p)
        if opened is not None:
            info["metadata"] = parse_json_object(decrypt_metadata(core, opened.keys))
            if core.kind == KIND_MANIFEST:
                with SealedReader(src, raw, opened.keys, owns_src=False) as r:
                    info["files"] = [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in read_manifest(r)]
        return info
    finally:
        src.close()


def _signature_report(p: Path) -> list[dict[str, Any]] | str:
    """What the signature file claims (not verified: that is ``modelseal verify``'s job)."""
    try:
        sf = SignatureFile.load(signature_path(p))
    except VerificationError as e:
        return f"unreadable: {e}"
    if sf is None:
        return []
    return [
        {"name": e.statement.name, "keyid": e.keyid[:16], "signed_at": e.statement.signed_at, "verified": False}
        for e in sf.signatures
    ]


def _slot_report(raw: RawArtifact, active: tuple[int, Slot] | None, authenticated: bool) -> dict[str, Any]:
    """Describe both recipient slots. Without a key nothing in them is authenticated:
    the recipients shown are those of the newest well-formed slot, and say so."""
    well_formed = {idx: slot for idx, slot in parse_slots(raw.slots)}

    def state(i: int) -> str:
        if not any(raw.slots[i]):
            return "empty"
        return "well-formed" if i in well_formed else "damaged"

    out: dict[str, Any] = {
        "slots": [
            {"slot": "AB"[i], "state": state(i), "generation": well_formed[i].generation if i in well_formed else None}
            for i in (0, 1)
        ],
        "recipients_authenticated": authenticated,
        "recipients": [],
        "slot_generation": None,
    }
    if active is not None:
        idx, slot = active
        out["active_slot"] = "AB"[idx]
        out["slot_generation"] = slot.generation
        out["recipients"] = [{"key": f"{r.scheme}:{r.key_id}", "version": r.key_version} for r in slot.recipients]
        other = state(1 - idx)
        out["inactive_slot"] = "present" if other == "well-formed" else other
    return out
