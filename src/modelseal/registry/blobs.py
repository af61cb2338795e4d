"""The registry's blob store: content-addressed ciphertext, and the parts of uploads in progress.

One tiny interface, two backends chosen by URL scheme (``registry.stores.open_blobs``):
a local folder (the embedded default, ``registry.localblobs``) and S3
(``registry.s3blobs``, SeaweedFS in the tests). The store holds bytes only. Which blobs exist for the API, which uploads
are open, their offsets and part lists, and what references what are the metadata
store's; a blob in the store that the metadata does not list is invisible and is swept.

Rules every backend keeps:

- **A blob is written once, whole, and only after its digest verified.** ``assemble``
  hashes the parts as it concatenates them and makes the blob visible (rename, or
  completing the S3 multipart upload) only if the SHA-256 matches; otherwise it leaves
  nothing and raises ``DigestMismatch``. A crash at any point leaves either no blob or
  the whole blob.
- **Parts are durable once ``commit`` returns**, so an upload survives the death of the
  instance that took a chunk, and another instance can take the next chunk.
- Keys (upload ids, digests) are validated by the caller; a backend still never lets
  one become a path outside its root (``digest_hex`` is 64 lowercase hex digits,
  upload ids are the server's own random ids).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Protocol

from modelseal.errors import BlobStoreError, DigestMismatch

HEX64 = re.compile(r"[0-9a-f]{64}")
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


def check_hex(digest_hex: str) -> str:
    """``digest_hex`` if it is 64 lowercase hex digits (a SHA-256), else ValueError."""
    if not HEX64.fullmatch(digest_hex):
        raise ValueError("not a sha256 hex digest")
    return digest_hex


def check_upload(upload: str) -> str:
    """``upload`` if it is a server-made upload id (32 lowercase hex digits), else ValueError."""
    if not UPLOAD_ID.fullmatch(upload):
        raise ValueError("not an upload id")
    return upload


class PartWriter(Protocol):
    """One part of an upload being written. ``write`` any number of times, then ``commit``
    (durable, returns the part's size) or ``abort`` (nothing left)."""

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


class BlobStore(Protocol):
    """Content-addressed blobs by SHA-256 hex digest, and upload parts by (upload id, index)."""

    def part_writer(self, upload: str, index: int) -> PartWriter:
        """A writer for part ``index`` of ``upload``; a part with that index is replaced."""
        ...

    def delete_upload(self, upload: str) -> None:
        """Remove every part of ``upload`` (idempotent)."""
        ...

    def assemble(self, upload: str, parts: Sequence[int], digest_hex: str, *, hashed: bool = False) -> int:
        """Concatenate ``parts`` (in order) into the blob ``digest_hex``, hashing as it goes.
        Returns the blob's size. Raises DigestMismatch, leaving no blob, if the hash differs.
        The parts are hashed even if the blob already exists (then only the
        copy is skipped): a known digest is never taken without its bytes. ``hashed``:
        the caller hashed exactly these parts' bytes as it wrote them and they matched
        (``registry.chunks.Running``), so a folder store need not read them back; a store
        that copies the bytes anyway may hash them again. The parts are
        left in place: the caller deletes the upload after recording the blob."""
        ...

    def size(self, digest_hex: str) -> int | None:
        """The blob's size, or None if the store has no such blob."""
        ...

    def read(self, digest_hex: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, start+length)`` of the blob (to its end if ``length`` is None),
        in chunks of at most a few MiB. Raises BlobStoreError if the blob is missing."""
        ...

    def delete(self, digest_hex: str) -> None:
        """Remove the blob (idempotent)."""
        ...

    def digests(self) -> Iterator[str]:
        """Every blob digest in the store (for the sweep of blobs the metadata no longer lists)."""
        ...

    def uploads(self) -> Iterator[str]:
        """Every upload id with parts in the store (for the sweep of abandoned uploads)."""
        ...


__all__ = [
    "BlobStore",
    "BlobStoreError",
    "DigestMismatch",
    "PartWriter",
    "check_hex",
    "check_upload",
]
