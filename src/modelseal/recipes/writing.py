"""The sealing engine that ``seal`` and ``reencrypt`` share: one plaintext stream into one
sealed file, a folder's blobs and manifest, a fresh data key and its wraps.

Writes only to the temporary paths it is handed; choosing, renaming and signing the output
are the callers'.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from modelseal.errors import PolicyDenied
from modelseal.format.envelope import HeaderPlan, new_dek
from modelseal.format.file import canonical_json, write_sealed
from modelseal.format.folder import (
    BLOB_DIR,
    MANIFEST_NAME,
    MAX_ENTRIES,
    MAX_MANIFEST,
    Entry,
    encode_manifest,
    relpath_problem,
)
from modelseal.format.header import (
    DEFAULT_CHUNK_LOG2,
    DEFAULT_SLOT,
    KIND_BLOB,
    KIND_MANIFEST,
    Recipient,
)
from modelseal.format.stream import Progress, ReadAt
from modelseal.keys.service import KeyService
from modelseal.signing.commitment import FileCommitment, commit_written
from modelseal.util.files import (
    fsync_dir,
)


@dataclass(frozen=True)
class Written:
    artifact_id: str
    sha256: str
    mac: str
    header: bytes
    table: bytes | None  # BLAKE3 per ciphertext chunk, when signing


def seal_stream(
    read_at: ReadAt,
    length: int,
    dst: Path,
    *,
    kind: int,
    dek: bytes,
    context: tuple[tuple[str, str], ...],
    metadata: Callable[[str], bytes],
    recipients: Callable[[str], tuple[Recipient, ...]],
    progress: Progress | None,
    hash_chunks: bool = False,
) -> Written:
    """Seal one plaintext into a new file ``dst`` (collecting chunk hashes if signing)."""
    plan = HeaderPlan(
        dek=dek,
        kind=kind,
        chunk_log2=DEFAULT_CHUNK_LOG2,
        plaintext_length=length,
        context=context,
        slot_size=DEFAULT_SLOT,
    )
    recips = recipients(plan.artifact_id) if kind != KIND_BLOB else ()
    table: list[bytes] | None = None
    if hash_chunks:
        table = [b""] * max(1, -(-length // plan.chunk_size))
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        digest, header = write_sealed(
            read_at, fd, plan, metadata, len(metadata("0" * 64)), recips, progress, chunk_hashes=table
        )
    finally:
        os.close(fd)
    return Written(plan.artifact_id, digest, plan.mac.hex(), header, b"".join(table) if table is not None else None)


FolderSource = Iterator[tuple[str, int, ReadAt]]


@dataclass
class WrittenFolder:
    artifact_id: str
    entries: list[Entry]
    commits: list[FileCommitment]
    manifest_header: bytes


def write_folder(
    tmp: Path,
    sources: FolderSource,
    dek: bytes,
    ctx: tuple[tuple[str, str], ...],
    recipients: Callable[[str], tuple[Recipient, ...]],
    progress: Progress | None,
    hash_chunks: bool = False,
) -> WrittenFolder:
    """Seal each (path, length, reader) as an opaque blob, then the manifest naming them."""
    (tmp / BLOB_DIR).mkdir(mode=0o700)
    entries: list[Entry] = []
    commits: list[FileCommitment] = []
    for rel, length, read_at in sources:
        blob = secrets.token_hex(16)
        w = seal_stream(
            read_at,
            length,
            tmp / BLOB_DIR / blob,
            kind=KIND_BLOB,
            dek=dek,
            context=ctx,
            metadata=lambda _d: b"{}",
            recipients=lambda _a: (),
            progress=progress,
            hash_chunks=hash_chunks,
        )
        entries.append(Entry(rel, length, w.sha256, blob, w.mac))
        if w.table is not None:
            commits.append(commit_written(f"{BLOB_DIR}/{blob}", w.header, w.table))
    fsync_dir(tmp / BLOB_DIR)
    manifest = encode_manifest(entries)
    w = seal_stream(
        bytes_reader(manifest),
        len(manifest),
        tmp / MANIFEST_NAME,
        kind=KIND_MANIFEST,
        dek=dek,
        context=ctx,
        metadata=lambda d: canonical_json({"files": len(entries), "sha256": d}),
        recipients=recipients,
        progress=None,
        hash_chunks=hash_chunks,
    )
    if w.table is not None:
        commits.append(commit_written(MANIFEST_NAME, w.header, w.table))
    return WrittenFolder(w.artifact_id, entries, commits, w.header)


def new_data_key(
    svc: KeyService, key_uris: list[str], context: tuple[tuple[str, str], ...]
) -> tuple[bytes, tuple[Recipient, ...]]:
    """A fresh DEK: from the first recipient's provider if it makes data keys (AWS KMS
    GenerateDataKey), else from the OS CSPRNG. Returns it with that first wrap, if any."""
    made = svc.generate(key_uris[0], context)
    if made is None:
        return new_dek(), ()
    return made[0], (made[1],)


def wrap_all(
    svc: KeyService,
    key_uris: Sequence[str],
    dek: bytes,
    context: tuple[tuple[str, str], ...],
    op: str = "wrap",
    made: tuple[Recipient, ...] = (),
) -> Callable[[str], tuple[Recipient, ...]]:
    """Wrap ``dek`` for every key, reusing the wraps already ``made`` (by GenerateDataKey)."""

    def wrap(aid: str) -> tuple[Recipient, ...]:
        return made + tuple(svc.wrap(k, dek, context, aid, op=op) for k in key_uris[len(made) :])

    return wrap


def check_sealable(paths: list[str]) -> None:
    """Refuse, before writing anything, a folder that readers would refuse to open
    (docs/format.md, section 8): the bounds first, then each path, then the manifest."""
    if len(paths) > MAX_ENTRIES:
        raise PolicyDenied(f"a sealed folder holds at most {MAX_ENTRIES} files; this one has {len(paths)}")
    for rel in paths:
        problem = relpath_problem(rel)
        if problem is not None:
            raise PolicyDenied(f"the file name {rel[:200]!r} cannot be sealed: it {problem}")
    probe = encode_manifest([Entry(rel, 2**63, "0" * 64, "0" * 32, "0" * 64) for rel in paths])
    if len(probe) > MAX_MANIFEST:
        raise PolicyDenied("the folder's manifest would exceed 64 MiB; split it into several artifacts")


def bytes_reader(data: bytes) -> ReadAt:
    view = memoryview(data)

    def read_at(buf: memoryview, offset: int) -> None:
        buf[:] = view[offset : offset + len(buf)]

    return read_at
