"""The folder backend of the blob store (``registry.blobs.BlobStore``): the embedded default.

Layout under the root (docs/registry.md, "Storage layout")::

    blobs/sha256/<2 hex>/<64 hex>/<8 digits>   a complete, verified blob: its segments, in order
    uploads/<32 hex>/<index>                    committed parts of an upload in progress (0600)
    uploads/<32 hex>/.<index>.*                 a part being written (never read)
    tmp/                                        blobs being assembled (never read)

A blob is a folder of segments: ``assemble`` hashes the committed parts in order (always,
even when the blob already exists) and, if they match the digest, hard-links them into a
folder under ``tmp/``, fsyncs it and renames it into place. The bytes are written and
fsynced once, when the part is committed, never copied: a 1 GiB push costs one write of
1 GiB, not two. A part is immutable once committed (a part written again under the same
index is a new file renamed over the old name, so a blob's link still names the old
bytes). Every write goes to a temporary name, is fsynced, renamed into place and its
folder fsynced: a crash leaves either nothing or the whole blob, so no partial blob is
ever visible under ``blobs/``. Names come only from ``check_hex``/``check_upload`` (hex
only) and part indexes (ints), so no request text ever becomes a path.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from modelseal.errors import BlobStoreError, DigestMismatch
from modelseal.format.stream import WritebackHint
from modelseal.registry.blobs import HEX64, UPLOAD_ID, check_hex, check_upload
from modelseal.util.files import fsync_dir

COPY_CHUNK = 4 << 20
EARLY_WRITEBACK = True  # dropped pages are not read back when the upload was hashed on arrival
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
        self._writeback = WritebackHint(self._fd) if EARLY_WRITEBACK else None

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None, "part already committed or aborted"
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self._size += n
            if self._writeback is not None:
                self._writeback.advance(self._size)
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
        """The folder of the blob's segments (whether or not it exists)."""
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

    def assemble(self, upload: str, parts: Sequence[int], digest_hex: str, *, hashed: bool = False) -> int:
        """The parts are hashed even when the blob exists (a claim of a known digest proves
        nothing); only the linking is skipped then (``registry.blobs.BlobStore.assemble``)."""
        final = self.blob_path(digest_hex)
        folder = self._upload_dir(upload)
        tmp = self.root / "tmp" / f"{digest_hex}.{secrets.token_hex(6)}"
        h = hashlib.sha256()
        size = 0
        try:
            # Open every part once: the links are checked to be the inodes that were hashed.
            files = [io.FileIO(folder / str(int(index)), "rb") for index in parts]
        except FileNotFoundError:
            raise BlobStoreError("blob store: a part of the upload is missing") from None
        except OSError as e:
            raise _io_error("assemble a blob", e) from None
        try:
            if hashed:  # hashed as written by this process (registry.chunks.Running): sizes only
                size = sum(os.fstat(f.fileno()).st_size for f in files)
            else:
                for f in files:
                    while chunk := f.read(COPY_CHUNK):
                        h.update(chunk)
                        size += len(chunk)
                if not hmac.compare_digest(h.hexdigest(), digest_hex):
                    raise DigestMismatch("the uploaded bytes do not hash to the digest given")
            if self.size(digest_hex) is not None:
                return size  # the same bytes are already stored
            os.mkdir(tmp, 0o700)
            for i, (index, f) in enumerate(zip(parts, files, strict=True)):
                seg = tmp / _segment(i)
                os.link(folder / str(int(index)), seg)
                if not os.path.samestat(os.stat(seg), os.fstat(f.fileno())):
                    # the part was written again since it was hashed: not the bytes checked
                    raise BlobStoreError("blob store: a part of the upload changed while it was assembled")
            fsync_dir(tmp)
            final.parent.mkdir(exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another process assembled the same digest first: the same bytes
            fsync_dir(final.parent)
        except OSError as e:
            raise _io_error("assemble a blob", e) from None
        finally:
            for f in files:
                f.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return size

    def _segments(self, digest_hex: str) -> list[tuple[Path, int]]:
        """The blob's segment files and sizes, in order; FileNotFoundError if there is no blob."""
        folder = self.blob_path(digest_hex)
        out = []
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if e.name.isdigit() and len(e.name) == _SEGMENT_DIGITS)
        for name in names:
            out.append((folder / name, (folder / name).stat().st_size))
        return out  # an empty blob is a folder with no segment

    def size(self, digest_hex: str) -> int | None:
        try:
            return sum(n for _, n in self._segments(digest_hex))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read(self, digest_hex: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        try:
            segments = self._segments(digest_hex)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobStoreError("blob store: no such blob") from None
        return _read_segments(segments, start, length)

    def delete(self, digest_hex: str) -> None:
        final = self.blob_path(digest_hex)
        gone = self.root / "tmp" / f"{digest_hex}.deleted.{secrets.token_hex(6)}"
        try:
            os.rename(final, gone)  # disappears at once, whole
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

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
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n


_SEGMENT_DIGITS = 8


def _segment(i: int) -> str:
    return f"{i:0{_SEGMENT_DIGITS}d}"


def _read_segments(segments: list[tuple[Path, int]], start: int, length: int | None) -> Iterator[bytes]:
    """The bytes ``[start, start+length)`` across the segments, READ_CHUNK at a time."""
    left = length
    offset = 0
    for path, n in segments:
        if left is not None and left <= 0:
            return
        if start >= offset + n:
            offset += n
            continue
        with io.FileIO(path, "rb") as f:
            f.seek(max(0, start - offset))
            while left is None or left > 0:
                chunk = f.read(READ_CHUNK if left is None else min(READ_CHUNK, left))
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        offset += n


__all__ = ["LocalBlobs"]
