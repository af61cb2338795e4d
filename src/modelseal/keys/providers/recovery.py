"""``recovery:NAME`` provider: the offline recovery key (docs/format.md, section 9a;
docs/recovery.md, "The offline recovery key").

A recovery key is a 32-byte random seed that exists only as k-of-n SLIP-0039 shares held by
custodians (``recovery.reckey`` makes and combines them). From the seed, HKDF-SHA256 derives an
ML-KEM-768 key (its 64-byte seed) and an X25519 key; together they are one hybrid
post-quantum HPKE key (RFC 9180 with ``MLKEM768-X25519``, HKDF-SHA256, AES-256-GCM). Wrapping
needs only the public key, ``$MODELSEAL_HOME/recovery/NAME.pub``, so every backup can be sealed
to it while the seed stays offline. Unwrapping needs the private key installed in this process
by ``install`` (which ``recovery.reckey.unlock`` calls after checking the shares against the
public key's fingerprint); nothing else ever holds it, and it is never written anywhere.

What this module does not know: shares, backups, the CLI.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, MLKEM768X25519PrivateKey, MLKEM768X25519PublicKey, Suite
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelseal.errors import DecryptionError, KeyNotFound, KeyProviderError
from modelseal.format.header import Recipient, encode_context
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited
from modelseal.util.home import check_private, modelseal_home

SCHEME = "recovery"
ALGORITHM = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"  # the HPKE suite, named in the public key file
PUBLIC_FORMAT = "modelseal-recovery-public/1"
PUBLIC_DIR = "recovery"
SEED_LEN = 32
VERSION = 1  # a recovery key has one version: a new key gets a new name
MLKEM_PUBLIC_LEN = 1184
X25519_PUBLIC_LEN = 32
PUBLIC_LEN = MLKEM_PUBLIC_LEN + X25519_PUBLIC_LEN
WRAPPED_LEN = 1088 + 32 + 32 + 16  # ML-KEM-768 ciphertext, X25519 share, the DEK and its tag
MAX_PUBLIC_FILE = 8192

_SUITE = Suite(KEM.MLKEM768_X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
_MLKEM_INFO = b"modelseal/recovery/v1/ml-kem-768-seed"
_X25519_INFO = b"modelseal/recovery/v1/x25519"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # as a keystore key's name
_INSTALLED: dict[str, tuple[bytes, MLKEM768X25519PrivateKey]] = {}  # name -> (fingerprint, key)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class PublicKey:
    """A recovery key's public half, as its ``.pub`` file describes it."""

    name: str
    public: bytes  # ML-KEM-768 public key (1184 bytes) || X25519 public key (32 bytes)
    fingerprint: bytes  # SHA-256 of ``public``
    created: float

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()

    def hpke_key(self) -> MLKEM768X25519PublicKey:
        return MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(self.public[:MLKEM_PUBLIC_LEN]),
            x25519.X25519PublicKey.from_public_bytes(self.public[MLKEM_PUBLIC_LEN:]),
        )


def _hkdf(seed: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length=length, salt=None, info=info).derive(seed)


def derive(seed: bytes) -> tuple[MLKEM768X25519PrivateKey, bytes]:
    """The HPKE private key of ``seed`` and the public key bytes (ML-KEM-768 || X25519)."""
    if len(seed) != SEED_LEN:
        raise KeyProviderError(f"a recovery key seed is {SEED_LEN} bytes")
    m = mlkem.MLKEM768PrivateKey.from_seed_bytes(_hkdf(seed, _MLKEM_INFO, 64))
    x = x25519.X25519PrivateKey.from_private_bytes(_hkdf(seed, _X25519_INFO, 32))
    public = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
    return MLKEM768X25519PrivateKey(m, x), public


def fingerprint(public: bytes) -> bytes:
    return hashlib.sha256(public).digest()


def public_path(name: str, home: Path | None = None) -> Path:
    check_name(name)
    return (home or modelseal_home()) / PUBLIC_DIR / f"{name}.pub"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise KeyProviderError("a recovery key name is 1-128 of [A-Za-z0-9._-], starting with a letter or digit")
    return name


def public_document(name: str, public: bytes, created: float) -> dict[str, Any]:
    """The ``.pub`` file's content (JSON; no secret)."""
    return {
        "algorithm": ALGORITHM,
        "created": int(created),
        "fingerprint": fingerprint(public).hex(),
        "format": PUBLIC_FORMAT,
        "name": name,
        "public_key": base64.b64encode(public).decode(),
    }


def load_public(name: str, home: Path | None = None) -> PublicKey:
    """Read and check ``recovery/NAME.pub``: refused if others could change it (it decides whom
    every backup is readable by), malformed, for another name, or not matching its fingerprint."""
    path = public_path(name, home)
    check_private(path, "the recovery public key", KeyProviderError, parent=True)
    try:
        raw = read_limited(path, MAX_PUBLIC_FILE, KeyProviderError, f"the recovery public key {path}", regular=True)
    except FileNotFoundError:
        raise KeyNotFound(f"no recovery key {name}: {path} does not exist (run 'modelseal backup keygen')") from None
    bad = KeyProviderError(f"{path} is not a valid recovery public key file")
    doc = json_loads(raw, max_depth=2, max_values=64, error=lambda _why: bad)
    if not isinstance(doc, dict) or doc.get("format") != PUBLIC_FORMAT or doc.get("algorithm") != ALGORITHM:
        raise bad
    if doc.get("name") != name or not isinstance(doc.get("created"), int):
        raise bad
    try:
        public = base64.b64decode(str(doc.get("public_key")), validate=True)
    except (binascii.Error, ValueError):
        raise bad from None
    fp = fingerprint(public)
    if len(public) != PUBLIC_LEN or not hmac.compare_digest(fp.hex(), str(doc.get("fingerprint"))):
        raise bad
    key = PublicKey(name, public, fp, float(doc["created"]))
    try:
        key.hpke_key()
    except ValueError:
        raise bad from None
    return key


def _info(name: str, version: int, fp: bytes, context: tuple[tuple[str, str], ...]) -> bytes:
    return (
        b"modelseal/recovery-wrap/v1\x00"
        + name.encode()
        + b"\x00"
        + struct.pack(">I", version)
        + fp
        + encode_context(context)
    )


def install(name: str, private: MLKEM768X25519PrivateKey, fp: bytes) -> None:
    """Make ``recovery:NAME`` unwrap in this process (its caller has checked ``fp``)."""
    with _LOCK:
        _INSTALLED[check_name(name)] = (fp, private)


def forget(name: str | None = None) -> None:
    """Drop one installed recovery key (all with None) from this process."""
    with _LOCK:
        if name is None:
            _INSTALLED.clear()
        else:
            _INSTALLED.pop(name, None)


def installed(name: str) -> bytes | None:
    """The fingerprint of the recovery key installed under ``name``, if any."""
    with _LOCK:
        entry = _INSTALLED.get(name)
    return entry[0] if entry is not None else None


class RecoveryProvider:
    scheme = SCHEME

    def __init__(self, home: Path | None = None) -> None:
        self._home = home

    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        key = load_public(name, self._home)
        sealed = _SUITE.encrypt(dek, key.hpke_key(), info=_info(name, VERSION, key.fingerprint, context))
        return Recipient(SCHEME, name, VERSION, sealed)

    def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
        name = check_name(recipient.key_id)
        with _LOCK:
            entry = _INSTALLED.get(name)
        if entry is None:
            raise KeyNotFound(
                f"recovery:{name} is not unlocked in this process (its custodians' shares unlock it: docs/recovery.md)"
            )
        if recipient.key_version != VERSION:
            raise KeyNotFound(f"recovery:{name} has no version {recipient.key_version}")
        if len(recipient.wrapped) != WRAPPED_LEN:
            raise DecryptionError()
        fp, private = entry
        try:
            return _SUITE.decrypt(recipient.wrapped, private, info=_info(name, VERSION, fp, context))
        except (InvalidTag, ValueError):
            raise DecryptionError() from None


__all__ = [
    "ALGORITHM",
    "SCHEME",
    "PublicKey",
    "RecoveryProvider",
    "derive",
    "fingerprint",
    "forget",
    "install",
    "installed",
    "load_public",
    "public_document",
    "public_path",
]
