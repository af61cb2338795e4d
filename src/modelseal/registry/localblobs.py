"""The folder backend of the blob store (``registry.blobs.BlobStore``): the embedded default.

Layout under the root (docs/registry.md, "Storage layout")::

    blobs/sha256/<2 hex>/<64 hex>     complete, verified blobs (read-only, 0600)
    uploads/<32 hex>/<index>          committed parts of an upload in progress
    uploads/<32 hex>/.<index>.*       a part being written (never read)
    tmp/                              blobs being assembled (never read)

Every write goes to a temporary name, is fsynced, renamed into place and its folder
fsynced: a crash leaves either nothing or the whole file, so no partial blob is ever
visible under ``blobs/``. Names come only from ``check_hex``/``check_upload`` (hex only) and
part indexes (ints), so no request text ever becomes a path.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from modelseal.errors import BlobStoreError, DigestMismatch
from modelseal.registry.blobs import HEX64, UPLOAD_ID, check_hex, check_upload
from modelseal.util.files import fsync_dir

COPY_CHUNK = 4 << 20
READ_CHUNK = 1 << 20


def _io_error(what: str, e: OSError) -> BlobStoreError:
    reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else os.strerror(e.errno or 0)
    return BlobStoreError(f"blob store: cannot {what}: {reason}")


class _Part:
    """One part being written to ``.<index>.<random>`` and renamed to ``<index>`` on commit."""

    def __init__(self, folder: Path, index: int) -> None:
        self._final = folder / str(index)
        self._tmp = folder / f".{index}.{secrets.token_hex(6)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _io_error("start an upload part", e) from None
        self._size = 0

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None, "part already committed or aborted"
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self._size += n
        except OSError as e:
            self.abort()
            raise _io_error("write an upload part", e) from None

    def commit(self) -> int:
        assert self._fd is not None, "part already committed or aborted"
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self._final)
            fsync_dir(self._final.parent)
        except OSError as e:
            self.abort()
            raise _io_error("commit an upload part", e) from None
        return self._size

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)


class LocalBlobs:
    """Blobs and upload parts in a folder (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("blobs/sha256", "uploads", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def blob_path(self, digest_hex: str) -> Path:
        """Where the blob lives (whether or not it exists); for a zero-copy file response."""
        check_hex(digest_hex)
        return self.root / "blobs" / "sha256" / digest_hex[:2] / digest_hex

    def _upload_dir(self, upload: str) -> Path:
        return self.root / "uploads" / check_upload(upload)

    def part_writer(self, upload: str, index: int) -> _Part:
        if not isinstance(index, int) or index < 0:
            raise ValueError("a part index is a non-negative int")
        return _Part(self._upload_dir(upload), index)

    def delete_upload(self, upload: str) -> None:
        shutil.rmtree(self._upload_dir(upload), ignore_errors=True)

    def assemble(self, upload: str, parts: Sequence[int], digest_hex: str) -> int:
        final = self.blob_path(digest_hex)
        have = self.size(digest_hex)
        if have is not None:
            return have
        folder = self._upload_dir(upload)
        tmp = self.root / "tmp" / f"{digest_hex}.{secrets.token_hex(6)}"
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "xb", buffering=0) as out:
                for index in parts:
                    with open(folder / str(int(index)), "rb", buffering=0) as part:
                        while chunk := part.read(COPY_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
                os.fsync(out.fileno())
            if h.hexdigest() != digest_hex:
                raise DigestMismatch("the uploaded bytes do not hash to the digest given")
            os.chmod(tmp, 0o400)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except FileNotFoundError:
            raise BlobStoreError("blob store: a part of the upload is missing") from None
        except OSError as e:
            raise _io_error("assemble a blob", e) from None
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def size(self, digest_hex: str) -> int | None:
        try:
            return self.blob_path(digest_hex).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, digest_hex: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        try:
            f = io.FileIO(self.blob_path(digest_hex), "rb")
        except FileNotFoundError:
            raise BlobStoreError("blob store: no such blob") from None
        return _chunks(f, start, length)

    def delete(self, digest_hex: str) -> None:
        self.blob_path(digest_hex).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        for fan in sorted((self.root / "blobs" / "sha256").iterdir()):
            for p in sorted(fan.iterdir()):
                if HEX64.fullmatch(p.name):
                    yield p.name

    def uploads(self) -> Iterator[str]:
        for p in sorted((self.root / "uploads").iterdir()):
            if UPLOAD_ID.fullmatch(p.name):
                yield p.name

    def sweep_tmp(self, older_than: float) -> int:
        """Remove assembly leftovers of crashed processes older than ``older_than`` (epoch s)."""
        n = 0
        for p in (self.root / "tmp").iterdir():
            try:
                if p.stat().st_mtime < older_than:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n


def _chunks(f: io.FileIO, start: int, length: int | None) -> Iterator[bytes]:
    with f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            want = READ_CHUNK if left is None else min(READ_CHUNK, left)
            chunk = f.read(want)
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk


__all__ = ["LocalBlobs"]
