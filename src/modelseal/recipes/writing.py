"""The sealing engine that ``seal`` and ``reencrypt`` share: one plaintext stream into one
sealed file, a folder's blobs and manifest, a fresh data key and its wraps.

Writes only to the temporary paths it is handed; choosing, renaming and signing the output
are the callers'. A folder's files are sealed ``FOLDER_PARALLEL`` at a time, each with its
own SHA-256 thread, so hashing runs in parallel and one file's final fsync overlaps the
next file's encryption.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from modelseal.errors import PolicyDenied, StorageError
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


FolderSource = Iterator[tuple[str, int, ReadAt]]  # sealed one after the other


@dataclass(frozen=True)
class Shard:
    """One file of a folder, opened only when it is sealed: ``open()`` yields (length, reader)."""

    path: str
    open: Callable[[], AbstractContextManager[tuple[int, ReadAt]]]


FOLDER_PARALLEL = 2  # files sealed at once (measured: docs/benchmarks.md, "Writes")


@dataclass
class WrittenFolder:
    artifact_id: str
    entries: list[Entry]
    commits: list[FileCommitment]
    manifest_header: bytes


def write_folder(
    tmp: Path,
    sources: FolderSource | Sequence[Shard],
    dek: bytes,
    ctx: tuple[tuple[str, str], ...],
    recipients: Callable[[str], tuple[Recipient, ...]],
    progress: Progress | None,
    hash_chunks: bool = False,
) -> WrittenFolder:
    """Seal each file as an opaque blob, then the manifest naming them (in the sources' order).

    ``Shard``s are sealed ``FOLDER_PARALLEL`` at a time; an iterator of (path, length,
    reader) one after the other. On the first failure the other files stop at their
    next chunk, and the error is raised once every writer has stopped.
    """
    (tmp / BLOB_DIR).mkdir(mode=0o700)

    def blob(rel: str, length: int, read_at: ReadAt, report: Progress | None) -> tuple[Entry, FileCommitment | None]:
        name = secrets.token_hex(16)
        w = seal_stream(
            read_at,
            length,
            tmp / BLOB_DIR / name,
            kind=KIND_BLOB,
            dek=dek,
            context=ctx,
            metadata=lambda _d: b"{}",
            recipients=lambda _a: (),
            progress=report,
            hash_chunks=hash_chunks,
        )
        commit = commit_written(f"{BLOB_DIR}/{name}", w.header, w.table) if w.table is not None else None
        return Entry(rel, length, w.sha256, name, w.mac), commit

    if isinstance(sources, Sequence):
        done = _parallel_blobs(sources, blob, progress)
    else:
        done = [blob(rel, length, read_at, progress) for rel, length, read_at in sources]
    entries = [e for e, _ in done]
    commits = [c for _, c in done if c is not None]
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


def _parallel_blobs(
    shards: Sequence[Shard],
    blob: Callable[[str, int, ReadAt, Progress | None], tuple[Entry, FileCommitment | None]],
    progress: Progress | None,
) -> list[tuple[Entry, FileCommitment | None]]:
    lock = threading.Lock()
    stop = threading.Event()

    def report(n: int) -> None:
        if progress is not None:
            with lock:  # the caller's callback (a progress bar) need not be thread-safe
                progress(n)

    def one(shard: Shard) -> tuple[Entry, FileCommitment | None]:
        if stop.is_set():
            raise StorageError("stopped: another file of the folder failed")
        with shard.open() as (length, read_at):

            def guarded(buf: memoryview, offset: int) -> None:
                if stop.is_set():
                    raise StorageError("stopped: another file of the folder failed")
                read_at(buf, offset)

            return blob(shard.path, length, guarded, report if progress is not None else None)

    with ThreadPoolExecutor(FOLDER_PARALLEL, thread_name_prefix="modelseal-file") as pool:
        futures = [pool.submit(one, s) for s in shards]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)  # the first failure in time, not in order
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    f.result()
            return [f.result() for f in futures]
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            raise


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
