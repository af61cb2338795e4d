"""Envelope layer: from a data key to the per-file keys, and back from recipients.

Owns the key schedule (HKDF-SHA256 from DEK, salt and the header binding),
the key commitment, the header and slot MACs, metadata encryption, building
a header for a new artifact and opening one by trying its recipients. It does
no file I/O and calls no provider itself: unwrapping is a callable handed in.
Every verification failure is the same ``DecryptionError``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError, KeystoreError, ModelsealError
from modelseal.format.header import (
    KIND_BLOB,
    KIND_FILE,
    KIND_MANIFEST,
    MAC_LEN,
    SALT_LEN,
    SUITE_V1,
    TAG_LEN,
    CoreHeader,
    Recipient,
    Slot,
    encode_core,
    encode_recipients,
    encode_slot,
    finish_core,
    parse_slot,
    slots_offset,
)

DEK_LEN = 32
_KDF_INFO = b"modelseal/v1/file-keys\x00"
_SLOT_LABEL = b"modelseal/v1/slot\x00"
_METADATA_NONCE = bytes(12)  # the metadata key is unique per file and used once


@dataclass(frozen=True)
class FileKeys:
    payload: bytes
    metadata: bytes
    mac: bytes
    commitment: bytes


def derive_file_keys(dek: bytes, salt: bytes, binding: bytes) -> FileKeys:
    if len(dek) != DEK_LEN:
        raise DecryptionError()
    info = _KDF_INFO + hashlib.sha256(binding).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=salt, info=info).derive(dek)
    return FileKeys(okm[0:32], okm[32:64], okm[64:96], okm[96:128])


_ATTACHMENT_INFO = b"modelseal/v1/attachment-key\x00"


def attachment_key(dek: bytes, salt: bytes, binding: bytes) -> bytes:
    """The key that encrypts attachments kept outside the artifact (the OMS bundle in
    the signature file): HKDF-SHA256 from the data key under its own label."""
    info = _ATTACHMENT_INFO + hashlib.sha256(binding).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(dek)


def _hmac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


def slot_mac(keys: FileKeys, header_mac: bytes, body: bytes) -> bytes:
    return _hmac(keys.mac, _SLOT_LABEL, header_mac, body)


def artifact_id(binding: bytes) -> str:
    """A public, stable id of an artifact (unchanged by rewrap): SHA-256 of its header binding."""
    return hashlib.sha256(binding).hexdigest()


class HeaderPlan:
    """A header being written: keys are known before the payload, metadata after it."""

    def __init__(
        self,
        *,
        dek: bytes,
        kind: int,
        chunk_log2: int,
        plaintext_length: int,
        context: tuple[tuple[str, str], ...],
        slot_size: int,
        salt: bytes | None = None,
    ) -> None:
        self.kind = kind
        self.chunk_size = 1 << chunk_log2
        self.plaintext_length = plaintext_length
        self.slot_size = 0 if kind == KIND_BLOB else slot_size
        self.salt = salt or os.urandom(SALT_LEN)
        self.binding = encode_core(
            suite=SUITE_V1,
            kind=kind,
            chunk_log2=chunk_log2,
            plaintext_length=plaintext_length,
            salt=self.salt,
            context=context,
        )
        self.keys = derive_file_keys(dek, self.salt, self.binding)
        self.artifact_id = artifact_id(self.binding)
        self.mac = b""  # the header MAC, once finish() has run

    def header_length(self, metadata_len: int) -> int:
        core = len(self.binding) + 4 + metadata_len + TAG_LEN + MAC_LEN + 2 + MAC_LEN
        return slots_offset(core, self.slot_size) + 2 * self.slot_size

    def finish(self, metadata: bytes, recipients: tuple[Recipient, ...] = ()) -> bytes:
        """The complete header: core, then slot A (generation 1) and an empty slot B."""
        metadata_ct = AESGCM(self.keys.metadata).encrypt(_METADATA_NONCE, metadata, None)
        pre = finish_core(self.binding, metadata_ct, self.keys.commitment, self.slot_size)
        mac = self.mac = _hmac(self.keys.mac, pre)
        if self.kind == KIND_BLOB:
            return pre + mac
        body = encode_recipients(1, recipients)
        slot_a = encode_slot(body, slot_mac(self.keys, mac, body), self.slot_size)
        core = pre + mac
        pad = bytes(slots_offset(len(core), self.slot_size) - len(core))
        return core + pad + slot_a + bytes(self.slot_size)


def verify_with_dek(core: CoreHeader, dek: bytes) -> FileKeys:
    """Check the key commitment (first, in constant time) and the header MAC."""
    keys = derive_file_keys(dek, core.salt, core.binding)
    if not hmac.compare_digest(keys.commitment, core.commitment):
        raise DecryptionError()
    if not hmac.compare_digest(_hmac(keys.mac, core.mac_input), core.mac):
        raise DecryptionError()
    return keys


_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_FILES = 100_000  # section 8: entries of a folder manifest


def _count(value: object, top: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


def check_metadata(core: CoreHeader, meta: Mapping[str, Any]) -> None:
    """Section 7's schema for the header's kind, checked on open (no plaintext needed):
    kind 1 ``{"name", "sha256", "size"}`` with ``size`` = L; kind 2 ``{"files",
    "sha256"}`` (the count and the digest are compared with the manifest by its reader);
    kind 3 ``{}``. Digests are 64 lowercase hex digits. Any defect: DecryptionError."""
    keys = set(meta)
    digest = meta.get("sha256")
    hexdigest = isinstance(digest, str) and _HEX64.fullmatch(digest) is not None
    if core.kind == KIND_FILE:
        ok = keys == {"name", "sha256", "size"} and isinstance(meta["name"], str) and hexdigest
        ok = ok and _count(meta["size"], 1 << 64) and meta["size"] == core.plaintext_length
    elif core.kind == KIND_MANIFEST:
        ok = keys == {"files", "sha256"} and hexdigest and _count(meta["files"], MAX_FILES)
    else:
        ok = not keys
    if not ok:
        raise DecryptionError()


def decrypt_metadata(core: CoreHeader, keys: FileKeys) -> bytes:
    try:
        return AESGCM(keys.metadata).decrypt(_METADATA_NONCE, core.metadata_ct, None)
    except InvalidTag:
        raise DecryptionError() from None


@dataclass(frozen=True)
class Opened:
    dek: bytes
    keys: FileKeys
    slot_index: int
    slot: Slot


def parse_slots(raw_slots: tuple[bytes, bytes]) -> list[tuple[int, Slot]]:
    """The well-formed, non-empty slots, newest generation first."""
    found: list[tuple[int, Slot]] = []
    for idx, raw in enumerate(raw_slots):
        try:
            slot = parse_slot(raw)
        except DecryptionError:
            continue  # a torn or damaged slot; the other may still be good
        if slot is not None:
            found.append((idx, slot))
    found.sort(key=lambda item: -item[1].generation)
    return found


# Which infrastructure error to report when no recipient opens: the most actionable.
_INFRA_RANK: dict[type[ModelsealError], int] = {KeystoreError: 4, KeyDisabled: 3, KeyNotFound: 2, KeyProviderError: 1}


def open_envelope(
    core: CoreHeader,
    raw_slots: tuple[bytes, bytes],
    unwrap: Callable[[Recipient], bytes],
) -> Opened:
    """Find a slot and a recipient that yield the data key, and verify everything.

    Infrastructure errors for one recipient (key not here, disabled, no local
    keystore or a wrong passphrase) fall through to the next recipient, so a
    host holding any one of the KEKs can open the artifact. If none works, a
    decryption failure wins (the artifact is wrong), else the most actionable
    infrastructure error is raised.
    """
    infra: ModelsealError | None = None
    failed = False
    for idx, slot in parse_slots(raw_slots):
        body = encode_recipients(slot.generation, slot.recipients)
        for r in slot.recipients:
            try:
                dek = unwrap(r)
                keys = verify_with_dek(core, dek)
                if not hmac.compare_digest(slot_mac(keys, core.mac, body), slot.mac):
                    raise DecryptionError()
            except DecryptionError:
                failed = True
                continue
            except (KeyProviderError, KeystoreError) as e:
                rank = max((v for k, v in _INFRA_RANK.items() if isinstance(e, k)), default=0)
                best = max((v for k, v in _INFRA_RANK.items() if isinstance(infra, k)), default=-1)
                if rank > best:
                    infra = e
                continue
            return Opened(dek, keys, idx, slot)
    if failed or infra is None:
        raise DecryptionError()
    raise infra


def new_slot_bytes(core: CoreHeader, keys: FileKeys, generation: int, recipients: tuple[Recipient, ...]) -> bytes:
    body = encode_recipients(generation, recipients)
    return encode_slot(body, slot_mac(keys, core.mac, body), core.slot_size)


def new_dek() -> bytes:
    return os.urandom(DEK_LEN)
