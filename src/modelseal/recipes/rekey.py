"""Re-keying recipes: rewrap (new KEK versions or recipients, header only) and reencrypt.

Owns the exclusive update lock on an artifact (``open_locked``), the in-place
rewrap through the A/B recipient slots (also rotation's ``rewrap_key``), and
re-sealing under a fresh data key. Which recipients are written is ``recipients``'
decision: the operator's keys only, never a list read from the artifact. Built on
``writing`` (sealing), ``opening`` and ``format.file`` (slot writes).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modelseal.errors import DecryptionError, FormatError, StorageError
from modelseal.format.envelope import artifact_id, new_dek
from modelseal.format.file import RawArtifact, canonical_json, open_keys, read_raw, write_slot_in_place
from modelseal.format.header import KIND_BLOB, KIND_FILE, Recipient
from modelseal.format.reader import SealedReader
from modelseal.format.source import FdSource
from modelseal.format.stream import Progress, ReadAt
from modelseal.keys.service import KeyService
from modelseal.recipes.context import check_keys_apart, service, unwrapper
from modelseal.recipes.opening import open as open_sealed
from modelseal.recipes.opening import open_folder, open_raw, primary_file
from modelseal.recipes.recipients import RekeyPlan, keys_to_write, named_keys, same_key
from modelseal.recipes.recipients import plan as plan_for
from modelseal.recipes.seal import SealResult
from modelseal.recipes.writing import FolderSource, seal_stream, wrap_all, write_folder
from modelseal.signing.sigfile import signature_path, signed_output, supersede
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


Confirm = Callable[[RekeyPlan], None]


def plan(
    path: str | os.PathLike[str],
    key: str | Sequence[str] | None = None,
    *,
    keys: KeyService | None = None,
    keep_recipients: Sequence[str] = (),
) -> RekeyPlan:
    """What ``rewrap``/``reencrypt`` with these arguments would write, without writing
    (the data key is unwrapped to authenticate the stored recipients). Raises
    ``PolicyDenied`` where they would."""
    p = Path(path)
    svc = service(keys)
    named = named_keys(key, keep_recipients)
    src, raw = open_raw(primary_file(p))
    try:
        if raw.core.kind == KIND_BLOB:
            raise FormatError(f"{p} is part of a sealed folder; name the folder")
        opened = open_keys(raw, unwrapper(svc, raw), src)
        return plan_for(svc, p, opened.slot.recipients, raw.core.context, named, keep_recipients)
    finally:
        src.close()


def rewrap(
    path: str | os.PathLike[str],
    key: str | Sequence[str] | None = None,
    *,
    keys: KeyService | None = None,
    keep_recipients: Sequence[str] = (),
    confirm: Confirm | None = None,
) -> RewrapResult:
    """Re-wrap the data key under the newest version of its key(s), or under ``key``.

    Only the header slot is rewritten; payload bytes are untouched, so the
    cost does not depend on the artifact's size. Without ``key``, every stored
    recipient must be one of the operator's keys (``recipes.recipients``) or be
    confirmed in ``keep_recipients``; ``confirm`` sees the plan before anything
    is written and may raise to stop.
    """
    p = Path(path)
    svc = service(keys)
    named = named_keys(key, keep_recipients)
    src, raw = open_locked(primary_file(p))
    try:
        if raw.core.kind == KIND_BLOB:
            raise FormatError(f"{p} is part of a sealed folder; rewrap the folder")
        opened = open_keys(raw, unwrapper(svc, raw, op="rewrap"))
        todo = plan_for(svc, p, opened.slot.recipients, raw.core.context, named, keep_recipients)
        if confirm is not None:
            confirm(todo)
        check_keys_apart(p)
        recips = wrap_all(svc, todo.write, opened.dek, raw.core.context, op="rewrap")(artifact_id(raw.core.binding))
        generation = write_slot_in_place(src.fd, raw, opened, recips)
        return RewrapResult(p, tuple(f"{r.scheme}:{r.key_id}#{r.key_version}" for r in recips), generation)
    finally:
        src.close()


def rewrap_key(
    path: str | os.PathLike[str],
    key: str,
    *,
    keys: KeyService | None = None,
    keep_recipients: Sequence[str] = (),
) -> RewrapResult:
    """Rotation's rewrap: re-wrap only ``key``'s recipients under its newest version.

    Every other stored recipient must be vouched for, as for ``rewrap``, and is kept
    as it is (rotating one key never needs another key's provider).
    """
    p = Path(path)
    svc = service(keys)
    canon = svc.canonical(key)
    src, raw = open_locked(primary_file(p))
    try:
        if raw.core.kind == KIND_BLOB:
            raise FormatError(f"{p} is part of a sealed folder; rotate the folder")
        opened = open_keys(raw, unwrapper(svc, raw, op="rewrap"))
        stored = opened.slot.recipients
        keys_to_write(svc, p, stored, raw.core.context, named=[key], keep=keep_recipients)
        check_keys_apart(p)
        aid = artifact_id(raw.core.binding)
        out: list[Recipient] = []
        fresh: Recipient | None = None
        for r in stored:
            if not same_key(svc, r, canon):
                out.append(r)
            elif fresh is None:
                fresh = svc.wrap(key, opened.dek, raw.core.context, aid, op="rewrap")
                out.append(fresh)
        generation = write_slot_in_place(src.fd, raw, opened, tuple(out))
        return RewrapResult(p, tuple(f"{r.scheme}:{r.key_id}#{r.key_version}" for r in out), generation)
    finally:
        src.close()


def reencrypt(
    path: str | os.PathLike[str],
    key: str | Sequence[str] | None = None,
    *,
    keys: KeyService | None = None,
    progress: Progress | None = None,
    keep_recipients: Sequence[str] = (),
    confirm: Confirm | None = None,
) -> SealResult:
    """Re-seal under a fresh data key (for a DEK that may be exposed). Writes a new
    artifact beside the old one and swaps it in atomically; the plaintext only
    passes through memory. The new data key goes only to the operator's keys:
    ``key``, or the stored recipients each vouched for as in ``rewrap``."""
    p = Path(path)
    svc = service(keys)
    named = named_keys(key, keep_recipients)
    dek = new_dek()
    check_keys_apart(p)
    # Hold the artifact's update lock (the manifest's, for a folder) until the new
    # artifact has replaced it, so a concurrent rewrap waits and then sees the new one.
    lock, _ = open_locked(primary_file(p))
    try:
        return _reencrypt_locked(p, _Rekey(named, keep_recipients, confirm), svc, dek, progress)
    finally:
        lock.close()


@dataclass(frozen=True)
class _Rekey:
    named: list[str] | None
    keep: Sequence[str]
    confirm: Confirm | None

    def uris(
        self, svc: KeyService, p: Path, stored: tuple[Recipient, ...], ctx: tuple[tuple[str, str], ...]
    ) -> list[str]:
        todo = plan_for(svc, p, stored, ctx, self.named, self.keep)
        if self.confirm is not None:
            self.confirm(todo)
        return list(todo.write)


def _reencrypt_locked(p: Path, rekey: _Rekey, svc: KeyService, dek: bytes, progress: Progress | None) -> SealResult:
    if p.is_dir():
        with open_folder(p, keys=svc) as folder:
            ctx = folder.raw_artifact.core.context
            uris = rekey.uris(svc, p, folder.recipients, ctx)

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
        ctx = r.raw_artifact.core.context
        uris = rekey.uris(svc, p, r.recipients, ctx)
        # The old signatures become the new file's history, moved into place with it.
        with signed_output(p, force=True) as tmp:
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
            supersede(signature_path(p), signature_path(tmp))
        return SealResult(p, w.artifact_id, 1, r.size, tuple(uris))


def _reader_at(r: SealedReader) -> ReadAt:
    def read_at(buf: memoryview, offset: int) -> None:
        if r.preadinto(offset, buf) != len(buf):
            raise DecryptionError()

    return read_at
