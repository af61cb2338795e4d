"""The CA's files under ``$MODELSEAL_HOME/ca/`` and how its private keys are protected.

Layout (docs/pki.md): ``ca.json`` (trust domain, KEK URI, the live generations),
``root-G.pem``, ``issuing-N.pem`` (public certificates), ``root-G.key.json``,
``issuing-N.key.json``, ``next-N.key.json`` (the sealed private keys: the root, the live
issuing key and the standby key of the next intermediate, whose pin clients hold as their
backup pin), ``issued.json`` and ``revoked.json``.
Every file is 0600 in a 0700 folder, written crash-safely (``util.files.write_atomic``).

A private key is never written in the clear: its PKCS#8 DER is encrypted with AES-256-GCM
under a fresh 32-byte data key, and that data key is wrapped through ``KeyService.wrap``
under the CA's KEK (``local:modelseal-ca`` by default, or a ``transit:``/``pkcs11:`` key),
with an encryption context naming the purpose, the CA key and the trust domain; the same
context is the AEAD's associated data, so a sealed key cannot be swapped for another.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelseal.errors import CertificateError, DecryptionError, KeyNotFound, PolicyDenied, StorageError
from modelseal.format.header import Recipient
from modelseal.keys.service import KeyService
from modelseal.util import bounded
from modelseal.util.files import read_limited, write_atomic
from modelseal.util.home import check_home, check_private, modelseal_home

DEFAULT_KEK = "local:modelseal-ca"
PURPOSE = "modelseal-ca"
SEALED_FORMAT = "modelseal-ca-key-v1"
MAX_FILE = 4 << 20  # issued.json and revoked.json are bounded well below this


def ca_dir(home: Path | None = None) -> Path:
    return (home or modelseal_home()) / "ca"


def ensure_dir(folder: Path) -> Path:
    """The CA folder, created 0700 if missing; refused if anyone else could change it."""
    home = folder.parent
    check_home(home, PolicyDenied)
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the CA folder {folder}: {e.strerror}") from None
    check_private(folder, "the CA folder", PolicyDenied)
    return folder


def write(folder: Path, name: str, data: bytes) -> None:
    write_atomic(folder / name, data, 0o600)


def read(folder: Path, name: str, limit: int = MAX_FILE) -> bytes | None:
    """A CA file's bytes, or None if it does not exist. A file others could change is refused."""
    path = folder / name
    check_private(path, f"CA file {name}", PolicyDenied)
    try:
        return read_limited(path, limit, StorageError, f"CA file {path}", regular=True)
    except FileNotFoundError:
        return None


def read_json(folder: Path, name: str, *, max_values: int = 200_000) -> Any:
    data = read(folder, name)
    if data is None:
        return None
    return bounded.json_loads(data, max_depth=6, max_values=max_values, error=CertificateError, what=f"CA file {name}")


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _context(which: str, trust_domain: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"purpose": PURPOSE, "ca": which, "trust_domain": trust_domain}.items()))


def _aad(context: tuple[tuple[str, str], ...]) -> bytes:
    return json.dumps([SEALED_FORMAT, list(context)], separators=(",", ":")).encode()


def ensure_kek(svc: KeyService, kek: str) -> str:
    """The KEK's URI; a missing ``local:`` key is created (other schemes must exist)."""
    uri = svc.canonical(kek)
    if uri.startswith("local:"):
        try:
            svc.info(uri)
        except KeyNotFound:
            svc.create(uri)
    return uri


def seal_key(svc: KeyService, kek: str, which: str, trust_domain: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The JSON document of ``key`` sealed under ``kek`` (see the module docstring)."""
    context = _context(which, trust_domain)
    dek = AESGCM.generate_key(bit_length=256)
    recipient = svc.wrap(kek, dek, context, op="wrap")
    nonce = os.urandom(12)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ciphertext = AESGCM(dek).encrypt(nonce, der, _aad(context))
    del der, dek
    doc = {
        "format": SEALED_FORMAT,
        "kek": kek,
        "ca": which,
        "trust_domain": trust_domain,
        "recipient": {
            "scheme": recipient.scheme,
            "key_id": recipient.key_id,
            "key_version": recipient.key_version,
            "wrapped": base64.b64encode(recipient.wrapped).decode(),
        },
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
    return dump_json(doc)


def unseal_key(svc: KeyService, data: bytes, which: str, trust_domain: str) -> ec.EllipticCurvePrivateKey:
    """The private key sealed in ``data`` (``seal_key``) for CA key ``which`` of ``trust_domain``."""
    doc = bounded.json_loads(data, max_depth=4, max_values=64, error=CertificateError, what=f"the sealed {which} key")
    try:
        if doc["format"] != SEALED_FORMAT or doc["ca"] != which or doc["trust_domain"] != trust_domain:
            raise CertificateError(f"the sealed {which} CA key is not this CA's")
        r = doc["recipient"]
        recipient = Recipient(str(r["scheme"]), str(r["key_id"]), int(r["key_version"]), base64.b64decode(r["wrapped"]))
        nonce = base64.b64decode(doc["nonce"], validate=True)
        ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise CertificateError(f"the sealed {which} CA key is malformed") from None
    context = _context(which, trust_domain)
    dek = svc.unwrap(recipient, context)
    try:
        der = AESGCM(dek).decrypt(nonce, ciphertext, _aad(context))
    except Exception:
        raise DecryptionError(
            f"the sealed {which} CA key does not open: tampered, or sealed under another key"
        ) from None
    try:
        key = serialization.load_der_private_key(der, password=None)
    except ValueError:
        raise CertificateError(f"the sealed {which} CA key is not a private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"the sealed {which} CA key is not an EC key")
    return key


def check_out_dir(path: Path) -> None:
    """A certificate folder given by the operator must be this user's (or not exist yet)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StorageError(f"cannot check {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PolicyDenied(f"{path} is not a folder (a symlink is refused)")
    if st.st_uid != os.geteuid():
        raise PolicyDenied(f"{path} belongs to another user (uid {st.st_uid}): refusing to write certificates there")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise PolicyDenied(f"{path} is writable by group or others; run: chmod go-w {path}")


__all__ = [
    "DEFAULT_KEK",
    "ca_dir",
    "check_out_dir",
    "dump_json",
    "ensure_dir",
    "ensure_kek",
    "read",
    "read_json",
    "seal_key",
    "unseal_key",
    "write",
]
