"""Re-keying recipes: rewrap (new KEK versions or recipients, header only) and reencrypt.

Owns the exclusive update lock on an artifact (``open_locked``), the in-place
rewrap through the A/B recipient slots, and re-sealing under a fresh data key.
Built on ``writing`` (sealing), ``opening`` and ``format.file`` (slot writes).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelseal.errors import DecryptionError, FormatError, StorageError
from modelseal.format.envelope import artifact_id, new_dek
from modelseal.format.file import RawArtifact, SealedReader, canonical_json, open_keys, read_raw, write_slot_in_place
from modelseal.format.header import KIND_BLOB, KIND_FILE, Recipient
from modelseal.format.source import FdSource
from modelseal.format.stream import Progress, ReadAt
from modelseal.keys.service import KeyService
from modelseal.recipes.context import check_keys_apart, key_list, service, unwrapper
from modelseal.recipes.opening import open as open_sealed
from modelseal.recipes.opening import open_folder, primary_file
from modelseal.recipes.seal import SealResult
from modelseal.recipes.writing import FolderSource, seal_stream, wrap_all, write_folder
from modelseal.signing.sigfile import signature_path, supersede
from modelseal.util.files import atomic_output, open_regular


def open_locked(path: Path) -> tuple[FdSource, RawArtifact]:
    """Open a sealed file for an in-place update under an exclusive ``flock``.

    The lock is taken before the header is read, and the path is re-checked to
    still name the locked file (a concurrent reencrypt may have replaced it).
    It is released when the returned source is closed.
    """
    for _ in range(5):
        src = FdSource(open_regular(path, os.O_RDWR))
        try:
            fcntl.flock(src.fd, fcntl.LOCK_EX)
            st = os.fstat(src.fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return src, read_raw(src)
        except BaseException:
            src.close()
            raise
        src.close()
    raise StorageError(f"{path} keeps being replaced while it is being updated; try again")


@dataclass(frozen=True)
class RewrapResult:
    path: Path
    recipients: tuple[str, ...]
    generation: int


def rewrap(
    path: str | os.PathLike[str], key: str | Sequence[str] | None = None, *, keys: KeyService | None = None
) -> RewrapResult:
    """Re-wrap the data key under the newest version of its key(s), or under ``key``.

    Only the header slot is rewritten; payload bytes are untouched, so the
    cost does not depend on the artifact's size.
    """
    p = Path(path)
    svc = service(keys)
    src, raw = open_locked(primary_file(p))
    try:
        if raw.core.kind == KIND_BLOB:
            raise FormatError(f"{p} is part of a sealed folder; rewrap the folder")
        opened = open_keys(raw, unwrapper(svc, raw, op="rewrap"))
        uris = key_list(key) if key is not None else [f"{r.scheme}:{r.key_id}" for r in opened.slot.recipients]
        check_keys_apart(p)
        recips = wrap_all(svc, uris, opened.dek, raw.core.context, op="rewrap")(artifact_id(raw.core.binding))
        generation = write_slot_in_place(src.fd, raw, opened, recips)
        return RewrapResult(p, tuple(f"{r.scheme}:{r.key_id}#{r.key_version}" for r in recips), generation)
    finally:
        src.close()


def reencrypt(
    path: str | os.PathLike[str],
    key: str | Sequence[str] | None = None,
    *,
    keys: KeyService | None = None,
    progress: Progress | None = None,
) -> SealResult:
    """Re-seal under a fresh data key (for a DEK that may be exposed). Writes a new
    artifact beside the old one and swaps it in atomically; the plaintext only
    passes through memory."""
    p = Path(path)
    svc = service(keys)
    dek = new_dek()
    check_keys_apart(p)
    # Hold the artifact's update lock (the manifest's, for a folder) until the new
    # artifact has replaced it, so a concurrent rewrap waits and then sees the new one.
    lock, _ = open_locked(primary_file(p))
    try:
        return _reencrypt_locked(p, key, svc, dek, progress)
    finally:
        lock.close()


def _reencrypt_locked(
    p: Path, key: str | Sequence[str] | None, svc: KeyService, dek: bytes, progress: Progress | None
) -> SealResult:
    if p.is_dir():
        with open_folder(p, keys=svc) as folder:
            uris = key_list(key) if key is not None else _uris(folder.recipients)
            ctx = folder.raw_artifact.core.context

            def sources() -> FolderSource:
                for e in folder.entries():
                    with folder.open(e.path) as r:
                        yield e.path, r.size, _reader_at(r)

            with atomic_output(p, force=True, is_dir=True) as tmp:
                f = write_folder(tmp, sources(), dek, ctx, wrap_all(svc, uris, dek, ctx), progress)
                supersede(signature_path(p), signature_path(tmp))
        return SealResult(p, f.artifact_id, len(f.entries), sum(e.size for e in f.entries), tuple(uris))
    with open_sealed(p, keys=svc) as r:
        meta = r.metadata()
        uris = key_list(key) if key is not None else _uris(r.recipients)
        ctx = r.raw_artifact.core.context
        with atomic_output(p, force=True) as tmp:
            w = seal_stream(
                _reader_at(r),
                r.size,
                tmp,
                kind=KIND_FILE,
                dek=dek,
                context=ctx,
                metadata=lambda d: canonical_json({**meta, "sha256": d, "size": r.size}),
                recipients=wrap_all(svc, uris, dek, ctx),
                progress=progress,
            )
        supersede(signature_path(p), signature_path(p))
        return SealResult(p, w.artifact_id, 1, r.size, tuple(uris))


def _reader_at(r: SealedReader) -> ReadAt:
    def read_at(buf: memoryview, offset: int) -> None:
        if r.preadinto(offset, buf) != len(buf):
            raise DecryptionError()

    return read_at


def _uris(recipients: tuple[Recipient, ...]) -> list[str]:
    return [f"{r.scheme}:{r.key_id}" for r in recipients]
