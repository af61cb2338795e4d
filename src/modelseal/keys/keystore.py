"""The embedded local keystore: one encrypted file under ``$MODELSEAL_HOME``.

Owns the keystore file format (docs/format.md, section 9), the passphrase
KDF (scrypt, parameters recorded in the file), locking, atomic updates and
the in-process unlocked cache. It does not wrap data keys; ``providers.local``
does that with the KEKs held here.

Layout: a random 32-byte root key is wrapped under the passphrase-derived key;
the key table (names, versions, states, KEK material) is one AES-256-GCM blob
under the root key. A wrong passphrase fails the root unwrap, so it is told
apart from a damaged body. Every save erases the KEK material of versions whose
scheduled destruction is overdue, whoever saves. ``rotate_root`` re-wraps the
table under a fresh root key, so earlier recovery shares and earlier copies of
the file (under any passphrase) no longer open the current keystore.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import getpass
import hashlib
import hmac
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from modelseal.errors import KeystoreError
from modelseal.util.files import write_atomic
from modelseal.util.hardening import dont_dump
from modelseal.util.home import modelseal_home

KEYSTORE_FORMAT = "modelseal-keystore/1"
DEFAULT_SCRYPT_LOG2_N = 17  # 128 MiB, about 0.4 s here: paid once per process
MIN_SCRYPT_LOG2_N = 14
MAX_SCRYPT_LOG2_N = 22
CACHE_TTL = 300.0
_ROOT_AAD = b"modelseal/keystore/v1/root"
_BODY_AAD = b"modelseal/keystore/v1/body"
PASSPHRASE_ENV = "MODELSEAL_PASSPHRASE"  # noqa: S105 (the name of a variable)
NEW_PASSPHRASE_ENV = "MODELSEAL_NEW_PASSPHRASE"  # noqa: S105 (the name of a variable)


def keystore_path(home: Path | None = None) -> Path:
    return (home or modelseal_home()) / "keystore.json"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any) -> bytes:
    if not isinstance(s, str):
        raise KeystoreError("keystore file is damaged")
    try:
        return base64.b64decode(s, validate=True)
    except ValueError:
        raise KeystoreError("keystore file is damaged") from None


def read_passphrase(confirm: bool = False, *, env_var: str = PASSPHRASE_ENV, prompt: str = "passphrase") -> bytes:
    """The passphrase from ``env_var`` (``MODELSEAL_PASSPHRASE``) or an interactive prompt."""
    env = os.environ.get(env_var)
    if env:
        return env.encode()
    if not sys.stdin.isatty():
        raise KeystoreError(f"no {prompt}: set {env_var} or run in a terminal")
    first = getpass.getpass(f"modelseal keystore {prompt}: ")
    if confirm and getpass.getpass(f"repeat {prompt}: ") != first:
        raise KeystoreError("the passphrases do not match")
    if not first:
        raise KeystoreError("an empty passphrase is not allowed")
    return first.encode()


def _derive(passphrase: bytes, salt: bytes, log2_n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=1 << log2_n, r=8, p=1).derive(passphrase)


def _wrapped_root_header(passphrase: bytes, root: bytes, log2_n: int) -> dict[str, Any]:
    """The file's ``format``, ``kdf`` and ``root`` members: ``root`` wrapped under the
    passphrase with a fresh salt and nonce."""
    if not MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N:
        raise KeystoreError("scrypt cost out of range")
    if not passphrase:
        raise KeystoreError("an empty passphrase is not allowed")
    salt, nonce = os.urandom(32), os.urandom(12)
    wrapped = AESGCM(_derive(passphrase, salt, log2_n)).encrypt(nonce, root, _ROOT_AAD)
    return {
        "format": KEYSTORE_FORMAT,
        "kdf": {"alg": "scrypt", "log2_n": log2_n, "r": 8, "p": 1, "salt": _b64(salt)},
        "root": {"nonce": _b64(nonce), "ct": _b64(wrapped)},
    }


def purge_overdue(keys: dict[str, Any], now: float) -> list[str]:
    """Erase the material of every version whose scheduled destruction is due at ``now``.

    Returns ``name#version`` of each. Run on every save, so that no keystore update
    (by whichever command) can write an overdue version back, and by ``key purge``.
    """
    done = []
    for name, entry in keys.items():
        for v, data in entry["versions"].items():
            if data["state"] == "pending-destroy" and float(data.get("destroy_after", 0)) <= now:
                data["state"], data["material"] = "destroyed", None
                data.pop("destroy_after", None)
                done.append(f"{name}#{v}")
    return done


@dataclass
class UnlockedKeystore:
    """The decrypted key table plus what is needed to write it back."""

    path: Path
    root_key: bytes
    header: dict[str, Any]  # format, kdf and wrapped root: re-written unchanged
    keys: dict[str, Any]
    signature: bytes  # SHA-256 of the file as last read or written

    def save(self, exclusive: bool = False, now: float | None = None) -> None:
        purge_overdue(self.keys, time.time() if now is None else now)
        body = json.dumps({"keys": self.keys}, sort_keys=True, separators=(",", ":")).encode()
        nonce = os.urandom(12)
        doc = dict(self.header)
        doc["body"] = {"nonce": _b64(nonce), "ct": _b64(AESGCM(self.root_key).encrypt(nonce, body, _BODY_AAD))}
        raw = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        write_atomic(self.path, raw, mode=0o600, exclusive=exclusive)
        self.signature = hashlib.sha256(raw).digest()


def create(
    path: Path,
    passphrase: bytes,
    *,
    scrypt_log2_n: int = DEFAULT_SCRYPT_LOG2_N,
    root_key: bytes | None = None,
) -> UnlockedKeystore:
    """Create a new, empty keystore at ``path`` (refuses to overwrite one)."""
    root = root_key or os.urandom(32)
    dont_dump(root)
    header = _wrapped_root_header(passphrase, root, scrypt_log2_n)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:  # a dangling symlink or a file in the way, say
        raise KeystoreError(f"cannot create the keystore's folder {path.parent}: {e.strerror or e}") from None
    ks = UnlockedKeystore(path, root, header, {}, b"")
    try:
        ks.save(exclusive=True)  # never replaces a keystore, even one created concurrently
    except FileExistsError:
        raise KeystoreError(f"a keystore already exists at {path}") from None
    return ks


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeystoreError(f"no keystore at {path}: run 'modelseal init' first") from None
    except OSError as e:
        raise KeystoreError(f"cannot read keystore {path}: {e.strerror}") from None


def _parse_doc(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise KeystoreError("keystore file is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != KEYSTORE_FORMAT:
        raise KeystoreError("keystore file is damaged or of an unknown format")
    return doc


def _field(obj: dict[str, Any], name: str, length: int) -> bytes:
    value = _unb64(obj.get(name))
    if len(value) != length:
        raise KeystoreError("keystore file is damaged")
    return value


def _open_body(doc: dict[str, Any], root: bytes) -> dict[str, Any]:
    body = doc.get("body")
    if not isinstance(body, dict):
        raise KeystoreError("keystore file is damaged")
    try:
        plain = AESGCM(root).decrypt(_field(body, "nonce", 12), _unb64(body.get("ct")), _BODY_AAD)
        dont_dump(plain)  # the KEKs, base64: kept out of core dumps (best effort)
        keys = json.loads(plain)["keys"]
    except (InvalidTag, ValueError, KeyError, TypeError, RecursionError):
        raise KeystoreError("keystore file is damaged") from None
    if not isinstance(keys, dict):
        raise KeystoreError("keystore file is damaged")
    return keys


def _unwrap_root(doc: dict[str, Any], passphrase: bytes) -> bytes:
    kdf, root = doc.get("kdf"), doc.get("root")
    if not isinstance(kdf, dict) or not isinstance(root, dict) or kdf.get("alg") != "scrypt":
        raise KeystoreError("keystore file is damaged or uses an unknown KDF")
    log2_n = kdf.get("log2_n")
    if not isinstance(log2_n, int) or not MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N:
        raise KeystoreError("keystore KDF parameters out of range")
    if kdf.get("r") != 8 or kdf.get("p") != 1:
        raise KeystoreError("keystore KDF parameters out of range")
    salt, nonce, ct = _field(kdf, "salt", 32), _field(root, "nonce", 12), _field(root, "ct", 32 + 16)
    key = _derive(passphrase, salt, log2_n)
    try:
        root = AESGCM(key).decrypt(nonce, ct, _ROOT_AAD)
    except InvalidTag:
        # Indistinguishable by design from a flipped bit in the wrapped root key.
        raise KeystoreError("wrong passphrase for the keystore") from None
    dont_dump(root)
    return root


_CACHE: dict[str, tuple[UnlockedKeystore, float, Callable[[], bytes]]] = {}


def clear_cache() -> None:
    _CACHE.clear()


def unlock(
    path: Path | None = None,
    passphrase: Callable[[], bytes] = read_passphrase,
    now: Callable[[], float] = time.monotonic,
) -> UnlockedKeystore:
    """Return the unlocked keystore, paying the KDF at most once per process and TTL.

    The file is re-read on every call (it is small) and compared by hash with
    the cached copy; a changed file is re-parsed with the cached root key, no
    KDF. A different passphrase source than the one that unlocked the cache
    is checked with the KDF again, never trusted.
    """
    path = path or keystore_path()
    raw = _read_file(path)
    sig = hashlib.sha256(raw).digest()
    hit = _CACHE.get(str(path))
    if hit is not None and hit[1] > now() and hit[2] is passphrase:
        ks = hit[0]
        if sig != ks.signature:
            doc = _parse_doc(raw)
            if _header_of(doc) != ks.header:
                # The root key was rotated or re-wrapped (another process): the cached
                # root is stale, so unlock again from the passphrase.
                _CACHE.pop(str(path), None)
                return unlock(path, passphrase, now)
            ks = UnlockedKeystore(path, ks.root_key, _header_of(doc), _open_body(doc, ks.root_key), sig)
            _CACHE[str(path)] = (ks, hit[1], passphrase)
        return ks
    doc = _parse_doc(raw)
    _check_mode(path)
    root = _unwrap_root(doc, passphrase())
    ks = UnlockedKeystore(path, root, _header_of(doc), _open_body(doc, root), sig)
    _CACHE[str(path)] = (ks, now() + CACHE_TTL, passphrase)
    return ks


def unlock_uncached(path: Path, passphrase: bytes) -> UnlockedKeystore:
    """Unlock ``path`` with ``passphrase`` now, paying the KDF, outside the process cache
    (``keys.agent``: the one unlock of an agent, whose key bytes it keeps itself)."""
    raw = _read_file(path)
    doc = _parse_doc(raw)
    _check_mode(path)
    root = _unwrap_root(doc, passphrase)
    return UnlockedKeystore(path, root, _header_of(doc), _open_body(doc, root), hashlib.sha256(raw).digest())


def reread(path: Path, root_key: Any, header: dict[str, Any], signature: bytes) -> UnlockedKeystore | None:
    """``path`` as it is now, opened with ``root_key`` (no KDF); None if it still hashes to
    ``signature``. ``KeystoreError`` if it is gone, readable by others, damaged, or under
    another root than ``header`` (rotated, recovered, replaced): unlock it again."""
    raw = _read_file(path)
    _check_mode(path)
    if hmac.compare_digest(sig := hashlib.sha256(raw).digest(), signature):
        return None
    doc = _parse_doc(raw)
    if _header_of(doc) != header:
        raise KeystoreError(f"keystore {path} was re-wrapped or replaced: unlock it again")
    return UnlockedKeystore(path, root_key, _header_of(doc), _open_body(doc, root_key), sig)


def _header_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in ("format", "kdf", "root") if k in doc}


def _check_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeystoreError(f"keystore {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")


@contextlib.contextmanager
def locked_update(
    path: Path | None = None,
    passphrase: Callable[[], bytes] = read_passphrase,
    clock: Callable[[], float] = time.time,
) -> Iterator[UnlockedKeystore]:
    """Hold the keystore's write lock, yield a fresh copy, save it on success.

    The save erases every version whose destruction is overdue by ``clock``
    (wall-clock seconds), whatever the caller changed.
    """
    path = path or keystore_path()
    unlock(path, passphrase)  # prompt (if needed) before taking the lock
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        base = unlock(path, passphrase)  # re-read under the lock
        # Work on a copy: if the caller fails midway, the cached table is untouched.
        work = UnlockedKeystore(path, base.root_key, dict(base.header), copy.deepcopy(base.keys), base.signature)
        yield work
        work.save(now=clock())
        _CACHE[str(path)] = (work, time.monotonic() + CACHE_TTL, passphrase)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- k-of-n recovery of the root key (SLIP-0039 Shamir shares) ----------------


def split_root(
    shares: int, threshold: int, path: Path | None = None, passphrase: Callable[[], bytes] = read_passphrase
) -> list[str]:
    """Split the keystore's root key into ``shares`` printable shares, any ``threshold`` of
    which restore it (Shamir over GF(256) with an RS1024 checksum per share, SLIP-0039,
    through the maintained ``shamir-mnemonic`` package)."""
    import shamir_mnemonic

    if not 1 <= threshold <= shares <= 16 or (threshold == 1 and shares > 1):
        raise KeystoreError("choose 1 <= threshold <= shares <= 16 (and a threshold of at least 2 for several shares)")
    ks = unlock(path or keystore_path(), passphrase)
    groups = shamir_mnemonic.generate_mnemonics(1, [(threshold, shares)], ks.root_key, b"", extendable=True)
    return list(groups[0])


def recover_root(
    mnemonics: list[str], new_passphrase: bytes, path: Path | None = None, *, scrypt_log2_n: int = DEFAULT_SCRYPT_LOG2_N
) -> None:
    """Restore access with ``threshold`` shares: the root they rebuild must open the key
    table; it is then wrapped under ``new_passphrase`` (fresh salt) and saved atomically."""
    import shamir_mnemonic

    path = path or keystore_path()
    if not new_passphrase:
        raise KeystoreError("an empty passphrase is not allowed")
    if len(set(mnemonics)) != len(mnemonics):
        raise KeystoreError("the same share was given twice")
    try:
        root = shamir_mnemonic.combine_mnemonics(mnemonics, b"")
    except (shamir_mnemonic.MnemonicError, ValueError) as e:
        raise KeystoreError(f"the shares do not combine: {str(e)[:160]}") from None
    dont_dump(root)
    raw = _read_file(path)
    doc = _parse_doc(raw)
    try:
        keys = _open_body(doc, root)
    except KeystoreError:
        raise KeystoreError("the shares combine, but not to this keystore's root key") from None
    header = _wrapped_root_header(new_passphrase, root, scrypt_log2_n)
    _replace_locked(path, raw, UnlockedKeystore(path, root, header, keys, b""), "recovery combine")


def rotate_root(
    path: Path | None = None,
    passphrase: Callable[[], bytes] = read_passphrase,
    new_passphrase: bytes | None = None,
    *,
    scrypt_log2_n: int | None = None,
) -> None:
    """Re-wrap the key table under a fresh random root key.

    ``passphrase`` must open the file as it is now (checked with the KDF, never taken
    from the cache). The new root is wrapped under ``new_passphrase``, or else the same
    passphrase, with a fresh salt. Whatever was made from the old root stops opening
    this keystore: the shares of every earlier ``split_root`` and every earlier copy of
    the file, under any passphrase. The KEKs do not change, so artifacts keep opening.
    One atomic replace: after a crash the file is the old keystore or the new one.
    """
    path = path or keystore_path()
    raw = _read_file(path)
    doc = _parse_doc(raw)
    _check_mode(path)
    current = passphrase()
    keys = _open_body(doc, _unwrap_root(doc, current))
    log2_n = scrypt_log2_n if scrypt_log2_n is not None else int(doc["kdf"]["log2_n"])
    root = os.urandom(32)
    dont_dump(root)
    header = _wrapped_root_header(current if new_passphrase is None else new_passphrase, root, log2_n)
    _replace_locked(path, raw, UnlockedKeystore(path, root, header, keys, b""), "root rotation")


def _replace_locked(path: Path, raw: bytes, new: UnlockedKeystore, what: str) -> None:
    """Save ``new`` over the file, under the write lock, if it still holds ``raw``."""
    lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if _read_file(path) != raw:
            raise KeystoreError(f"the keystore changed during the {what}; run it again")
        new.save()
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    _CACHE.pop(str(path), None)
