"""Header codec of the sealed format (docs/format.md, sections 3 and 4).

This module owns the byte layout of the core header and of the recipient
slots: encoding, strict canonical parsing and bounds. It knows no crypto and
no keys; MAC values are opaque 32-byte fields to it. Every length read from
input is checked against a fixed bound before anything is allocated.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from modelseal.errors import DecryptionError, FormatError

MAGIC = b"\x89MSEAL\r\n"
FORMAT_VERSION = 1
SUITE_V1 = "MSEAL1-AES256GCM-HKDFSHA256-HMACSHA256"
KNOWN_SUITES = frozenset({SUITE_V1})

KIND_FILE = 1
KIND_MANIFEST = 2
KIND_BLOB = 3
KINDS = frozenset({KIND_FILE, KIND_MANIFEST, KIND_BLOB})

MIN_CHUNK_LOG2 = 16
MAX_CHUNK_LOG2 = 24
DEFAULT_CHUNK_LOG2 = 20
MAX_PLAINTEXT = 1 << 50
SALT_LEN = 32
MAC_LEN = 32
TAG_LEN = 16

MAX_CONTEXT_ENTRIES = 64
MAX_CONTEXT_VALUE = 1024
MAX_METADATA_CT = 65536 + TAG_LEN
MIN_SLOT = 512
MAX_SLOT = 16384
DEFAULT_SLOT = 4096
MAX_RECIPIENTS = 16
MAX_KEY_ID = 512
MAX_WRAPPED = 2048
MAX_HEADER = 1 << 20
SLOT_ALIGN = 4096  # slots start on a 4 KiB boundary so a torn sector never spans both


def slots_offset(core_len: int, slot_size: int) -> int:
    """Where slot A starts: the core header's end rounded up to ``SLOT_ALIGN`` (blobs: no slots)."""
    return core_len if slot_size == 0 else -(-core_len // SLOT_ALIGN) * SLOT_ALIGN


RESERVED_CONTEXT_KEYS = frozenset({"modelseal"})  # awskms adds modelseal=v1 to every EncryptionContext
_CONTEXT_KEY = re.compile(rb"[a-z0-9][a-z0-9._-]{0,63}")
_SCHEME = re.compile(rb"[a-z][a-z0-9]{0,15}")
# Key ids end up in terminals, audit logs and error messages: none may hold a character
# that breaks or reorders a line there (docs/format.md, section 4): C0 and C1 controls,
# DEL, the line and paragraph separators, and the bidirectional formatting characters.
# A fixed list, not a Unicode category, so that no Unicode update changes what parses.
_KEY_ID_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def valid_key_id(key_id: str) -> bool:
    """Whether ``key_id`` is 1..512 bytes of UTF-8 free of the characters section 4 forbids."""
    try:
        size = len(key_id.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return 1 <= size <= MAX_KEY_ID and not _KEY_ID_FORBIDDEN.search(key_id)


@dataclass(frozen=True)
class Recipient:
    """One wrapped copy of the data key. Public: no secret is in here."""

    scheme: str
    key_id: str
    key_version: int
    wrapped: bytes


@dataclass(frozen=True)
class Slot:
    generation: int
    recipients: tuple[Recipient, ...]
    mac: bytes


@dataclass(frozen=True)
class CoreHeader:
    suite: str
    kind: int
    chunk_log2: int
    plaintext_length: int
    salt: bytes
    context: tuple[tuple[str, str], ...]
    metadata_ct: bytes
    commitment: bytes
    slot_size: int
    mac: bytes
    raw: bytes  # the exact bytes from offset 0 through ``mac``
    binding_len: int  # prefix length that the file keys are bound to

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_log2

    @property
    def slots_offset(self) -> int:
        return slots_offset(len(self.raw), self.slot_size)

    @property
    def payload_offset(self) -> int:
        return self.slots_offset + 2 * self.slot_size

    @property
    def binding(self) -> bytes:
        return self.raw[: self.binding_len]

    @property
    def mac_input(self) -> bytes:
        return self.raw[:-MAC_LEN]


def _bad(what: str) -> DecryptionError:
    # Header damage past the version/suite is reported like any other
    # decryption failure: the message does not say which check failed.
    del what
    return DecryptionError()


class _Cursor:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _bad("truncated")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])


def normalize_context(context: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """Validate an encryption context and return it in canonical order."""
    items = sorted((context or {}).items(), key=lambda kv: kv[0].encode())
    if len(items) > MAX_CONTEXT_ENTRIES:
        raise ValueError(f"encryption context has more than {MAX_CONTEXT_ENTRIES} entries")
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError("encryption context keys and values must be strings")
        if k in RESERVED_CONTEXT_KEYS:
            raise ValueError(f"the context key {k!r} is reserved")
        if not _CONTEXT_KEY.fullmatch(k.encode()):
            raise ValueError(f"invalid context key {k!r}: use 1-64 of [a-z0-9._-], starting with a letter or digit")
        if len(v.encode()) > MAX_CONTEXT_VALUE:
            raise ValueError(f"context value for {k!r} is longer than {MAX_CONTEXT_VALUE} bytes")
    return tuple(items)


def encode_context(context: tuple[tuple[str, str], ...]) -> bytes:
    out = [struct.pack(">H", len(context))]
    for k, v in context:
        kb, vb = k.encode(), v.encode()
        out.append(struct.pack(">B", len(kb)) + kb + struct.pack(">H", len(vb)) + vb)
    return b"".join(out)


def _parse_context(cur: _Cursor) -> tuple[tuple[str, str], ...]:
    count = cur.u16()
    if count > MAX_CONTEXT_ENTRIES:
        raise _bad("context count")
    entries: list[tuple[str, str]] = []
    prev: bytes | None = None
    for _ in range(count):
        kb = cur.take(cur.u8())
        if not _CONTEXT_KEY.fullmatch(kb) or (prev is not None and kb <= prev):
            raise _bad("context key")
        vlen = cur.u16()
        if vlen > MAX_CONTEXT_VALUE:
            raise _bad("context value")
        try:
            v = cur.take(vlen).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise _bad("context value") from None
        entries.append((kb.decode(), v))
        prev = kb
    return tuple(entries)


def encode_core(
    *,
    suite: str,
    kind: int,
    chunk_log2: int,
    plaintext_length: int,
    salt: bytes,
    context: tuple[tuple[str, str], ...],
) -> bytes:
    """The binding prefix: every immutable field up to the end of the context."""
    sb = suite.encode("ascii")
    return b"".join(
        [
            MAGIC,
            struct.pack(">HB", FORMAT_VERSION, len(sb)),
            sb,
            struct.pack(">BBQ", kind, chunk_log2, plaintext_length),
            salt,
            encode_context(context),
        ]
    )


def finish_core(binding: bytes, metadata_ct: bytes, commitment: bytes, slot_size: int) -> bytes:
    """Everything after the binding prefix except the MAC, which the caller appends."""
    return binding + struct.pack(">I", len(metadata_ct)) + metadata_ct + commitment + struct.pack(">H", slot_size)


def peek_version(prefix: bytes) -> None:
    """Raise FormatError unless ``prefix`` starts like a sealed artifact we support."""
    if len(prefix) < len(MAGIC) or prefix[: len(MAGIC)] != MAGIC:
        raise FormatError("not a modelseal artifact (bad magic)")
    if len(prefix) < len(MAGIC) + 2:
        raise _bad("truncated")
    (version,) = struct.unpack(">H", prefix[len(MAGIC) : len(MAGIC) + 2])
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported format version {version}; this release reads version {FORMAT_VERSION}")


def parse_core(data: bytes | memoryview) -> CoreHeader:
    """Parse the core header at the start of ``data`` (which may run on into slots)."""
    peek_version(bytes(data[: len(MAGIC) + 2]))
    cur = _Cursor(data)
    cur.pos = len(MAGIC) + 2
    slen = cur.u8()
    raw_suite = cur.take(slen)
    try:
        suite = raw_suite.decode("ascii")
    except UnicodeDecodeError:
        suite = ""
    if suite not in KNOWN_SUITES:
        raise FormatError(f"unsupported algorithm suite {raw_suite[:64]!r}")
    kind = cur.u8()
    chunk_log2 = cur.u8()
    plaintext_length = cur.u64()
    if kind not in KINDS or not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2 or plaintext_length > MAX_PLAINTEXT:
        raise _bad("core fields")
    salt = cur.take(SALT_LEN)
    context = _parse_context(cur)
    binding_len = cur.pos
    mlen = cur.u32()
    if not TAG_LEN <= mlen <= MAX_METADATA_CT:
        raise _bad("metadata length")
    metadata_ct = cur.take(mlen)
    commitment = cur.take(MAC_LEN)
    slot_size = cur.u16()
    if kind == KIND_BLOB:
        if slot_size != 0:
            raise _bad("blob slots")
    elif not MIN_SLOT <= slot_size <= MAX_SLOT or slot_size % MIN_SLOT:
        raise _bad("slot size")
    mac = cur.take(MAC_LEN)
    if cur.pos > MAX_HEADER:
        raise _bad("header too large")
    return CoreHeader(
        suite=suite,
        kind=kind,
        chunk_log2=chunk_log2,
        plaintext_length=plaintext_length,
        salt=salt,
        context=context,
        metadata_ct=metadata_ct,
        commitment=commitment,
        slot_size=slot_size,
        mac=mac,
        raw=bytes(data[: cur.pos]),
        binding_len=binding_len,
    )


def encode_recipients(generation: int, recipients: tuple[Recipient, ...]) -> bytes:
    """Slot body (generation and recipients) that the slot MAC covers."""
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise ValueError(f"an artifact needs 1 to {MAX_RECIPIENTS} recipients")
    seen: set[tuple[str, str]] = set()
    out = [struct.pack(">QB", generation, len(recipients))]
    for r in recipients:
        if not valid_key_id(r.key_id):
            raise ValueError("a recipient key id must be 1-512 bytes of UTF-8 without control characters")
        sb, kb = r.scheme.encode("ascii"), r.key_id.encode("utf-8")
        if not _SCHEME.fullmatch(sb) or not 1 <= len(r.wrapped) <= MAX_WRAPPED:
            raise ValueError("recipient field out of range")
        if not 0 <= r.key_version < 1 << 32 or (r.scheme, r.key_id) in seen:
            raise ValueError("recipient version out of range or duplicated")
        seen.add((r.scheme, r.key_id))
        out.append(struct.pack(">B", len(sb)) + sb + struct.pack(">H", len(kb)) + kb)
        out.append(struct.pack(">IH", r.key_version, len(r.wrapped)) + r.wrapped)
    return b"".join(out)


def encode_slot(body: bytes, mac: bytes, slot_size: int) -> bytes:
    if len(body) + MAC_LEN > slot_size:
        raise OverflowError("recipients do not fit in the header slot")
    return (body + mac).ljust(slot_size, b"\x00")


def parse_slot(data: bytes) -> Slot | None:
    """Parse one slot. ``None`` for an empty (all-zero) slot.

    Raises DecryptionError for a malformed slot; the caller may still use the
    other slot (a torn write leaves at most one slot damaged).
    """
    if not any(data):
        return None
    cur = _Cursor(data)
    generation = cur.u64()
    count = cur.u8()
    if generation == 0 or not 1 <= count <= MAX_RECIPIENTS:
        raise _bad("slot")
    recipients: list[Recipient] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(count):
        sb = cur.take(cur.u8())
        klen = cur.u16()
        if not _SCHEME.fullmatch(sb) or not 1 <= klen <= MAX_KEY_ID:
            raise _bad("recipient")
        try:
            key_id = cur.take(klen).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise _bad("recipient") from None
        if _KEY_ID_FORBIDDEN.search(key_id):
            raise _bad("recipient key id")
        version = cur.u32()
        wlen = cur.u16()
        if not 1 <= wlen <= MAX_WRAPPED:
            raise _bad("recipient")
        scheme = sb.decode("ascii")
        if (scheme, key_id) in seen:
            raise _bad("duplicate recipient")
        seen.add((scheme, key_id))
        recipients.append(Recipient(scheme, key_id, version, cur.take(wlen)))
    mac = cur.take(MAC_LEN)
    if any(data[cur.pos :]):
        raise _bad("slot padding")
    return Slot(generation, tuple(recipients), mac)
