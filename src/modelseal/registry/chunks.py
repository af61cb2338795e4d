"""One chunk of an upload being received, and the running hash of an upload's bytes.

``Chunk`` (``Registry.begin_chunk``) writes a chunk's bytes into a part of the blob store
and, on ``close``, advances the upload by compare-and-set. ``Running`` hashes the bytes as
they arrive, for an upload this process received whole, one chunk at a time: then
``Registry.finish`` compares the SHA-256 without reading the parts back (and a sha512
digest, up to ``RUNNING_HASH_LIMIT``, has its SHA-256 storage key). Any chunk this process
did not see, two chunks at once, or a chunk that failed drops the running hash, and the
blob store hashes the stored parts instead.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from modelseal.errors import RegistryRefused
from modelseal.registry.blobs import BlobStore
from modelseal.registry.meta import Upload
from modelseal.registry.sqlmeta import SqlMeta

RUNNING_HASH_LIMIT = 64 << 20  # sha512 costs 3.5x sha256 here: only for blobs up to this size


def refused(status: int, code: str, message: str) -> RegistryRefused:
    """The refusal the server answers: an HTTP status, an OCI error code and a one-line message."""
    return RegistryRefused(message, status=status, code=code)


class Uploads(Protocol):
    """What a chunk needs of the registry (``registry.service.Registry``)."""

    meta: SqlMeta
    blobs: BlobStore
    now: Callable[[], float]
    _running: OrderedDict[str, Running]

    def upload_status(self, repo: str, upload: str, owner: str) -> Upload: ...


class Running:
    """SHA-256 (and, up to ``RUNNING_HASH_LIMIT``, SHA-512) of an upload's bytes so far."""

    def __init__(self) -> None:
        self.received = 0
        self.active = False  # a chunk is being written
        self.sha256 = hashlib.sha256()
        self.sha512: hashlib._Hash | None = hashlib.sha512()

    def update(self, data: bytes, end: int) -> None:
        """Hash ``data``, which ends at byte ``end`` of the upload."""
        self.sha256.update(data)
        if self.sha512 is not None:
            if end <= RUNNING_HASH_LIMIT:
                self.sha512.update(data)
            else:
                self.sha512 = None


class Chunk:
    """One chunk of an upload being received (``Registry.begin_chunk``): ``write`` any number
    of times (from any thread, one at a time), then ``close`` (the part is committed and the
    upload advanced by compare-and-set; returns the upload) or ``abort`` (nothing is left).
    Calls are serialized, so an ``abort`` waits for a ``write`` still running."""

    def __init__(
        self, reg: Uploads, row: Upload, owner: str, index: int, running: Running | None, length: int | None
    ) -> None:
        self._reg, self._row, self._owner, self._running, self._length = reg, row, owner, running, length
        self._writer = reg.blobs.part_writer(row.id, index)
        self._index, self._size = index, 0
        self._lock = threading.Lock()
        self._open = True

    def write(self, data: bytes) -> None:
        with self._lock:
            if not self._open:
                raise refused(400, "BLOB_UPLOAD_INVALID", "the chunk was already closed")
            try:
                self._size += len(data)
                if self._length is not None and self._size > self._length:
                    raise refused(400, "SIZE_INVALID", "the body is longer than its Content-Length/Content-Range")
                self._writer.write(data)
                running = self._running
                if running is not None:
                    running.update(data, running.received + self._size)
            except BaseException:
                self._abort()
                raise

    def close(self) -> Upload:
        with self._lock:
            if not self._open:
                raise refused(400, "BLOB_UPLOAD_INVALID", "the chunk was already closed")
            reg, row, size = self._reg, self._row, self._size
            try:
                if self._length is not None and size != self._length:
                    raise refused(400, "SIZE_INVALID", f"the body has {size} bytes, {self._length} were announced")
                if size == 0:
                    self._writer.abort()
                    self._open = False
                    if self._running is not None:
                        self._running.active = False
                    return row
                committed = self._writer.commit()
                self._open = False
            except BaseException:
                self._abort()
                raise
        if not reg.meta.upload_advance(row.id, row.received, self._index, committed, reg.now()):
            reg._running.pop(row.id, None)
            now = reg.upload_status(row.repo, row.id, self._owner)
            raise refused(
                416, "BLOB_UPLOAD_INVALID", f"another chunk was appended first; the upload has {now.received} bytes"
            )
        running = self._running
        if running is not None:
            running.received = row.received + committed
            running.active = False
        return reg.upload_status(row.repo, row.id, self._owner)

    def abort(self) -> None:
        with self._lock:
            self._abort()

    def _abort(self) -> None:
        if self._open:
            self._open = False
            self._writer.abort()
            self._reg._running.pop(self._row.id, None)


__all__ = ["RUNNING_HASH_LIMIT", "Chunk", "Running", "refused"]
