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
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelseal.errors import DecryptionError, StorageError
from modelseal.format.envelope import (
    HeaderPlan,
    Opened,
    check_metadata,
    decrypt_metadata,
    new_slot_bytes,
    open_envelope,
)
from modelseal.format.header import MAGIC, CoreHeader, Recipient, parse_core, peek_version
from modelseal.format.source import CipherSource
from modelseal.format.stream import (
    ChunkCipher,
    ChunkLayout,
    Progress,
    ReadAt,
    pwrite_all,
)
from modelseal.format.writer import encrypt_file_range
from modelseal.util.bounded import json_loads

_HEADER_READ = 160 * 1024  # bigger than the largest core header the bounds allow (135,565 bytes)


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
    """Open the envelope, then check the metadata block (section 7: canonical JSON, the
    schema of its kind, ``size`` = L). With ``src``, a failure to open is retried once on
    freshly read slots: a reader racing a rewrap may have copied one slot before and one
    after the writer's two steps, and seen neither valid."""
    try:
        opened = open_envelope(raw.core, raw.slots, unwrap)
    except DecryptionError:
        if src is None or not raw.core.slot_size:
            raise
        again = _pread(src, 2 * raw.core.slot_size, raw.core.slots_offset)
        n = raw.core.slot_size
        if again == raw.slots[0] + raw.slots[1] or len(again) != 2 * n:
            raise
        opened = open_envelope(raw.core, (again[:n], again[n:]), unwrap)
    check_metadata(raw.core, parse_json_object(decrypt_metadata(raw.core, opened.keys)))
    return opened


def canonical_json(obj: Any) -> bytes:
    """The one canonical JSON encoding of the format (docs/format.md, section 2): sorted
    keys (by code point), no white space, non-ASCII as raw UTF-8, ``json.dumps``' escapes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def parse_json_object(data: bytes) -> dict[str, Any]:
    """The encrypted metadata (at most 64 KiB): one flat JSON object, bounded before parsing,
    and accepted only in its canonical encoding (which also rules out duplicate keys, a
    BOM, white space, escapes where raw UTF-8 is due, and a lone surrogate)."""
    obj = json_loads(data, max_depth=2, max_values=4096, error=lambda _why: DecryptionError())
    if not isinstance(obj, dict):
        raise DecryptionError()
    try:
        canonical = canonical_json(obj)
    except ValueError:  # a lone surrogate (UnicodeEncodeError), NaN: not canonical JSON
        raise DecryptionError() from None
    if canonical != data:
        raise DecryptionError()
    return obj


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
