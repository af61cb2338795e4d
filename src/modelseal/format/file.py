"""One sealed file on disk: reading its header, random-access reading, writing, re-slotting.

Owns the I/O of a single sealed file: pread of the header and slots, the
length check (no truncation, no trailing data), ``SealedReader`` (a binary
file-like object with ``pread``) and the in-place A/B slot update used by
rewrap. Key unwrapping is handed in as a callable; format rules live in
``header``, ``stream`` and ``envelope``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelseal.errors import DecryptionError, StorageError
from modelseal.format.envelope import FileKeys, HeaderPlan, Opened, decrypt_metadata, new_slot_bytes, open_envelope
from modelseal.format.header import MAGIC, CoreHeader, Recipient, parse_core, peek_version
from modelseal.format.source import CipherSource
from modelseal.format.stream import (
    ChunkCipher,
    ChunkLayout,
    Progress,
    ReadAt,
    decrypt_into,
    decrypt_scatter,
    encrypt_file_range,
    pwrite_all,
)
from modelseal.util.bounded import json_loads
from modelseal.util.hardening import secret_buffer

_HEADER_READ = 160 * 1024  # bigger than the largest core header the bounds allow


@dataclass(frozen=True)
class RawArtifact:
    core: CoreHeader
    slots: tuple[bytes, bytes]
    layout: ChunkLayout


def _pread(src: CipherSource, size: int, offset: int) -> bytes:
    buf = bytearray(size)
    n = src.readinto_at(memoryview(buf), offset)
    return bytes(buf[:n])


def read_raw(src: CipherSource) -> RawArtifact:
    """Parse the header of the sealed file in ``src`` and check its exact length."""
    size = src.size
    head = _pread(src, min(size, _HEADER_READ), 0)
    if len(head) < len(MAGIC) + 2:
        peek_version(head)
    core = parse_core(head)
    n = core.slot_size
    gap = core.slots_offset - len(core.raw)
    tail = _pread(src, gap + 2 * n, len(core.raw)) if n else b""
    if len(tail) != gap + 2 * n or any(tail[:gap]):
        raise DecryptionError()  # truncated, or non-zero alignment padding
    raw_slots = tail[gap:]
    layout = ChunkLayout(core.chunk_size, core.plaintext_length, core.payload_offset)
    if size != layout.file_length:
        raise DecryptionError()  # truncated, or bytes appended
    return RawArtifact(core, (raw_slots[:n], raw_slots[n:]), layout)


def open_keys(raw: RawArtifact, unwrap: Callable[[Recipient], bytes], src: CipherSource | None = None) -> Opened:
    """Open the envelope. With ``src``, a failure is retried once on freshly read slots:
    a reader racing a rewrap may have copied one slot before and one after the
    writer's two steps, and seen neither valid."""
    try:
        return open_envelope(raw.core, raw.slots, unwrap)
    except DecryptionError:
        if src is None or not raw.core.slot_size:
            raise
        again = _pread(src, 2 * raw.core.slot_size, raw.core.slots_offset)
        n = raw.core.slot_size
        if again == raw.slots[0] + raw.slots[1] or len(again) != 2 * n:
            raise
        return open_envelope(raw.core, (again[:n], again[n:]), unwrap)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_json_object(data: bytes) -> dict[str, Any]:
    """The encrypted metadata (at most 64 KiB): one flat JSON object, bounded before parsing."""
    obj = json_loads(data, max_depth=2, max_values=4096, error=lambda _why: DecryptionError())
    if not isinstance(obj, dict):
        raise DecryptionError()
    return obj


class SealedReader(io.RawIOBase):
    """Read-only, seekable view of a sealed file's plaintext.

    ``pread``/``preadinto`` decrypt only the chunks a range spans, straight
    into the caller's buffer, and are safe to call from several threads.
    Small sequential reads go through a one-chunk cache.
    """

    def __init__(
        self,
        src: CipherSource,
        raw: RawArtifact,
        keys: FileKeys,
        name: str | None = None,
        owns_src: bool = True,
        chunk_hashes: bytes | None = None,
    ) -> None:
        super().__init__()
        self._src = src
        self._owns_src = owns_src
        self.raw_artifact = raw
        self._cipher = ChunkCipher(keys.payload, raw.layout, chunk_hashes)
        self.verified = chunk_hashes is not None  # every chunk read is checked against a signature
        self._keys = keys
        self._pos = 0
        self._lock = threading.Lock()
        self._cache_index = -1
        self._cache = secret_buffer(raw.layout.chunk_size)  # plaintext: out of core dumps
        self.name = name
        self.size = raw.core.plaintext_length
        self.context = dict(raw.core.context)
        self.recipients: tuple[Recipient, ...] = ()
        self.attachment_key = b""  # set by recipes.opening.open: decrypts the signature file's attachments
        self.verdict: Any = None  # the signature verdict, when verified on open

    def metadata(self) -> dict[str, Any]:
        return parse_json_object(decrypt_metadata(self.raw_artifact.core, self._keys))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError("invalid whence")
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def preadinto(self, offset: int, buf: memoryview | bytearray, *, private: bool = False) -> int:
        """Decrypt plaintext at ``offset`` into ``buf``; returns the byte count.

        ``private=True`` promises that ``buf`` is fresh memory no other thread or
        process can see until this returns (a tensor being loaded): whole chunks
        are then decrypted in place, skipping a copy. Either way a failure zeroes
        the range and raises DecryptionError.
        """
        if self.closed:
            raise ValueError("I/O operation on closed file")
        view = memoryview(buf).cast("B")
        if offset < 0:
            raise ValueError("negative offset")
        n = max(0, min(len(view), self.size - offset))
        if n == 0:
            return 0
        cs = self._cipher.layout.chunk_size
        i = offset // cs
        if (offset + n - 1) // cs == i and n < cs:
            with self._lock:
                if self._cache_index != i:
                    self._cache_index = -1
                    clen = self._cipher.layout.plain_len(i)
                    decrypt_into(self._cipher, self._src, i * cs, memoryview(self._cache)[:clen], private=True)
                    self._cache_index = i
                lo = offset - i * cs
                view[:n] = self._cache[lo : lo + n]
            return n
        decrypt_into(self._cipher, self._src, offset, view[:n], private=private)
        return n

    def preadinto_many(self, offset: int, bufs: list[memoryview], *, private: bool = False) -> None:
        """Fill consecutive buffers from plaintext ``offset`` in one parallel pass
        (e.g. every tensor of a model). The range must lie inside the plaintext."""
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if offset < 0 or offset + sum(len(b) for b in bufs) > self.size:
            raise ValueError("range outside the plaintext")
        decrypt_scatter(self._cipher, self._src, offset, [memoryview(b).cast("B") for b in bufs], private=private)

    def pread(self, offset: int, size: int) -> bytes:
        buf = bytearray(max(0, min(size, self.size - offset)))
        self.preadinto(offset, buf)
        return bytes(buf)

    def readinto(self, buf: Any) -> int:
        n = self.preadinto(self._pos, buf)
        self._pos += n
        return n

    def readall(self) -> bytes:
        out = bytearray(max(0, self.size - self._pos))
        self.readinto(out)
        return bytes(out)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a sealed reader has no plaintext file descriptor")

    def close(self) -> None:
        if not self.closed:
            self._cache[:] = bytes(len(self._cache))
            self._cache_index = -1
            if self._owns_src:
                self._src.close()
        super().close()


def write_sealed(
    read_at: ReadAt,
    dst_fd: int,
    plan: HeaderPlan,
    metadata: Callable[[str], bytes],
    metadata_len: int,
    recipients: tuple[Recipient, ...],
    progress: Progress | None = None,
    chunk_hashes: list[bytes] | None = None,
) -> tuple[str, bytes]:
    """Encrypt the plaintext from ``read_at`` into ``dst_fd`` in one pass.

    Returns the plaintext SHA-256 (hex) and the header written. The payload is
    written first at its final offset, the header last, once the digest is
    known: the metadata's length does not depend on the digest. With
    ``chunk_hashes`` (``layout.count`` entries) the BLAKE3 of each ciphertext
    chunk is stored there on the way, for signing.
    """
    header_len = plan.header_length(metadata_len)
    layout = ChunkLayout(plan.chunk_size, plan.plaintext_length, header_len)
    try:
        # Reserve the space up front: a full disk fails here, before any work,
        # and extent allocation is cheaper in one go than page by page.
        os.posix_fallocate(dst_fd, 0, layout.file_length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise StorageError(f"cannot reserve {layout.file_length} bytes for the output: {e.strerror}") from None
    digest = hashlib.sha256()
    encrypt_file_range(ChunkCipher(plan.keys.payload, layout), read_at, dst_fd, progress, digest.update, chunk_hashes)
    hexdigest = digest.hexdigest()
    header = plan.finish(metadata(hexdigest), recipients)
    if len(header) != header_len:
        raise AssertionError("header length changed between plan and finish")
    pwrite_all(dst_fd, header, 0)
    try:
        os.ftruncate(dst_fd, layout.file_length)
        os.fsync(dst_fd)
    except OSError as e:
        raise StorageError(f"write failed: {e.strerror}") from None
    return hexdigest, header


def write_slot_in_place(fd: int, raw: RawArtifact, opened: Opened, recipients: tuple[Recipient, ...]) -> int:
    """Rewrap without touching the payload: write the new recipients into the inactive
    slot with a higher generation, fsync, then zero the old slot and fsync again.

    A crash between the steps leaves both slots valid (readers prefer the
    newer one); at no point is neither slot valid. The caller holds an
    exclusive lock on the artifact, so two rewraps cannot interleave. The new
    generation follows the *authenticated* slot's, never an unverified one.
    """
    core = raw.core
    generation = opened.slot.generation + 1
    if generation >= 1 << 64:
        raise StorageError("the header slot generation counter is exhausted; use reencrypt")
    try:
        slot = new_slot_bytes(core, opened.keys, generation, recipients)
    except OverflowError:
        raise StorageError(
            f"the new recipients do not fit in this artifact's {core.slot_size}-byte header slot; use reencrypt"
        ) from None
    target = 1 - opened.slot_index
    base = core.slots_offset
    try:
        pwrite_all(fd, slot, base + target * core.slot_size)
        os.fsync(fd)
        # The other slot may hold a wrap under an exposed or retired KEK: erase it.
        pwrite_all(fd, bytes(core.slot_size), base + (1 - target) * core.slot_size)
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"write failed: {e.strerror}") from None
    return generation
