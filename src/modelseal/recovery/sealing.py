"""Sealing a backup part from memory, and opening one back (docs/recovery.md, "Backups").

A part's plaintext is only ever in this process's memory: ``seal_part`` encrypts it with
modelseal's own format (docs/format.md; a kind-1 sealed file, ``format.file.write_sealed``)
into an anonymous in-memory file (``memfd``) and returns the sealed bytes; nothing unsealed
touches a disk. Its encryption context binds the environment, the purpose, the backup id and
the part's name, so a part cannot be passed off as another backup's or another part.

``unseal_part`` checks the part's digest against the verified manifest before parsing a byte,
then the context, then opens it through ``KeyService`` (audited) with whatever recipient this
host can reach: none is a one-line ``BackupError`` naming the recipients; a part that does not
open under a reachable key, or whose plaintext digest differs, is ``BackupTampered``.
``load_verified`` (``recovery.chain``) is re-exported here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from pathlib import Path

from modelseal.errors import (
    BackupError,
    BackupTampered,
    DecryptionError,
    FormatError,
    KeyDisabled,
    KeyNotFound,
    KeyProviderError,
    KeystoreError,
    PolicyDenied,
)
from modelseal.format.envelope import HeaderPlan
from modelseal.format.file import canonical_json, open_keys, read_raw, write_sealed
from modelseal.format.header import DEFAULT_CHUNK_LOG2, DEFAULT_SLOT, KIND_FILE, normalize_context
from modelseal.format.reader import SealedReader
from modelseal.keys.service import KeyService
from modelseal.recipes.context import unwrapper
from modelseal.recipes.writing import bytes_reader, new_data_key, wrap_all
from modelseal.recovery.chain import load_verified as load_verified
from modelseal.recovery.manifest import Manifest, PartEntry
from modelseal.recovery.stores import BackupStore
from modelseal.util.hardening import dont_dump

PURPOSE = "backup"
_UNREACHABLE = (KeyNotFound, KeyDisabled, KeystoreError, KeyProviderError, PolicyDenied)


class BytesSource:
    """A ``format.source.CipherSource`` over sealed bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    @property
    def size(self) -> int:
        return len(self._view)

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        chunk = self._view[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        return None


def part_context(env: str, backup_id: str, part: str) -> tuple[tuple[str, str], ...]:
    return normalize_context({"backup": backup_id, "env": env, "part": part, "purpose": PURPOSE})


def seal_part(name: str, data: bytes, *, env: str, backup_id: str, key_uris: Sequence[str], svc: KeyService) -> bytes:
    """``data`` sealed to every key of ``key_uris`` (each wrap audited), as a sealed file's bytes."""
    ctx = part_context(env, backup_id, name)
    dek, made = new_data_key(svc, list(key_uris), ctx)
    wrap = wrap_all(svc, key_uris, dek, ctx, made=made)
    plan = HeaderPlan(
        dek=dek,
        kind=KIND_FILE,
        chunk_log2=DEFAULT_CHUNK_LOG2,
        plaintext_length=len(data),
        context=ctx,
        slot_size=DEFAULT_SLOT,
    )

    def meta(digest: str) -> bytes:
        return canonical_json({"name": name, "sha256": digest, "size": len(data)})

    recipients = wrap(plan.artifact_id)
    fd = os.memfd_create("modelseal-backup-part", os.MFD_CLOEXEC)  # memory, never a disk
    try:
        try:
            write_sealed(bytes_reader(data), fd, plan, meta, len(meta("0" * 64)), recipients)
        except OverflowError:
            raise BackupError(
                f"the {len(recipients)} recipients of a backup part do not fit in its 4 KiB recipient slot"
                " (a recovery key takes about 1.2 KB): list fewer recovery keys in [backup] recovery_keys"
            ) from None
        size = os.fstat(fd).st_size
        out = bytearray(size)
        got = os.preadv(fd, [out], 0)
        if got != size:
            raise BackupError("reading the sealed part back from memory failed")
    finally:
        os.close(fd)
    return bytes(out)


def _open(store: BackupStore, m: Manifest, entry: PartEntry) -> tuple[BytesSource, bytes]:
    data = store.read(m.id, entry.file, entry.size)
    if len(data) != entry.size or not hmac.compare_digest(hashlib.sha256(data).hexdigest(), entry.sha256):
        raise BackupTampered(f"part {entry.name} of backup {m.id} does not match its manifest: tampered")
    return BytesSource(data), data


def unseal_part(store: BackupStore, manifest: Manifest, entry: PartEntry, svc: KeyService) -> bytes:
    """The plaintext of one part of a verified backup, in memory (see the module docstring)."""
    src, _ = _open(store, manifest, entry)
    what = f"part {entry.name} of backup {manifest.id}"
    try:
        raw = read_raw(src)
    except (DecryptionError, FormatError):
        raise BackupTampered(f"{what} is not a sealed file") from None
    ctx = dict(raw.core.context)
    want = {"backup": manifest.id, "part": entry.name, "purpose": PURPOSE}
    if raw.core.kind != KIND_FILE or any(ctx.get(k) != v for k, v in want.items()):
        raise BackupTampered(f"{what} is sealed as another backup's or another part: swapped")
    if manifest.env is not None and ctx.get("env") != manifest.env:
        raise BackupTampered(f"{what} is sealed for another environment than the backup's")
    try:
        opened = open_keys(raw, unwrapper(svc, raw), src)
    except _UNREACHABLE as e:
        raise BackupError(
            f"no recipient of backup {manifest.id} can be reached here ({', '.join(manifest.recipients)}):"
            f" {type(e).__name__}: {e}"
        ) from None
    except DecryptionError:
        raise BackupTampered(f"{what} does not open under its recipients' keys") from None
    reader = SealedReader(src, raw, opened.keys, name=entry.name, owns_src=False)
    try:
        meta = reader.metadata()
        plain = reader.readall()
    except DecryptionError:
        raise BackupTampered(f"{what} fails authentication") from None
    finally:
        reader.close()
    dont_dump(plain)
    digest = hashlib.sha256(plain).hexdigest()
    if meta.get("name") != entry.name or not hmac.compare_digest(str(meta.get("sha256")), digest):
        raise BackupTampered(f"{what} does not hold what it was sealed with")
    return plain


def verify_backup(
    url: str,
    backup_id: str | None = None,
    *,
    svc: KeyService,
    signer_keys: Sequence[str] = (),
    home: Path | None = None,
    deep: bool = False,
    expect_sequence: int | None = None,
    expect_manifest: str | None = None,
) -> tuple[Manifest, dict[str, int]]:
    """``load_verified``; with ``deep`` also every part unsealed here and its plaintext checked.
    Returns the manifest and, when deep, each part's plaintext size (the plaintext is dropped)."""
    store, m = load_verified(
        url,
        backup_id,
        signer_keys=signer_keys,
        home=home,
        expect_sequence=expect_sequence,
        expect_manifest=expect_manifest,
    )
    opened: dict[str, int] = {}
    try:
        for entry in m.parts if deep else ():
            opened[entry.name] = len(unseal_part(store, m, entry, svc))
    finally:
        store.close()
    return m, opened


__all__ = ["PURPOSE", "BytesSource", "load_verified", "part_context", "seal_part", "unseal_part", "verify_backup"]
