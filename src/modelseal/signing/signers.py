"""Signing keys and DSSE envelopes (docs/format.md, section 10).

Owns the two signature algorithms (Ed25519, and ECDSA P-256 with SHA-256,
DER-encoded, which OpenSSF model-signing uses), key ids, the ``Signer``
interface that backends (PEM files here; an HSM or Transit later) implement,
and DSSE v1 signing and verification over its pre-authentication encoding.
Pure functions apart from reading a PEM file; no artifact knowledge.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from modelseal.errors import SigningKeyError
from modelseal.util.files import read_limited

ED25519 = "ed25519"
P256 = "ecdsa-p256-sha256"
ALGORITHMS = (ED25519, P256)
PASSPHRASE_ENV = "MODELSEAL_SIGN_PASSPHRASE"  # noqa: S105 (the name of a variable)
MAX_KEY_FILE = 64 << 10

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _algorithm_of(key: PublicKey) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ED25519
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return P256
    raise SigningKeyError("unsupported key type: modelseal signs with Ed25519 or ECDSA P-256")


def spki(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id_of(key: PublicKey) -> str:
    """A public key's id: SHA-256 of its DER SubjectPublicKeyInfo, hex (as TUF and sigstore do)."""
    return hashlib.sha256(spki(key)).hexdigest()


@dataclass(frozen=True)
class VerifyKey:
    """A public key that signatures are checked against."""

    key: PublicKey
    algorithm: str
    key_id: str

    @classmethod
    def from_public(cls, key: Any) -> VerifyKey:
        return cls(key, _algorithm_of(key), key_id_of(key))

    @classmethod
    def from_pem(cls, data: bytes, where: str = "public key") -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise SigningKeyError(f"{where} is not a PEM public key") from None
        return cls.from_public(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> VerifyKey:
        return cls.from_pem(_read_key_file(Path(path)), str(path))

    def pem(self) -> str:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, data)
            else:
                self.key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


class Signer(Protocol):
    """What signing needs from a key: its public half and a signature over bytes.

    Backends: ``PemSigner`` (a private key file); an HSM or Transit signer
    implements the same three members.
    """

    @property
    def public(self) -> VerifyKey: ...

    def sign(self, data: bytes) -> bytes: ...


class PemSigner:
    """A private key from a PEM file (PKCS#8 or traditional, optionally encrypted)."""

    def __init__(self, key: PrivateKey) -> None:
        self._key = key
        self.public = VerifyKey.from_public(key.public_key())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], passphrase: bytes | None = None) -> PemSigner:
        p = Path(path)
        return cls.from_pem(_read_key_file(p), str(p), passphrase)

    @classmethod
    def from_env(cls, var: str) -> PemSigner:
        """A PEM private key held in an environment variable (a CI secret): no key file
        is ever written."""
        data = os.environ.get(var)
        if not data:
            raise SigningKeyError(f"the environment variable {var} holds no signing key")
        return cls.from_pem(data.encode(), f"${var}")

    @classmethod
    def from_pem(cls, data: bytes, where: str, passphrase: bytes | None = None) -> PemSigner:
        if passphrase is None and b"ENCRYPTED" in data:
            passphrase = read_sign_passphrase(Path(where))
        try:
            key = serialization.load_pem_private_key(data, passphrase)
        except TypeError:
            raise SigningKeyError(f"{where} is encrypted: set {PASSPHRASE_ENV} or run in a terminal") from None
        except (ValueError, UnsupportedAlgorithm):
            raise SigningKeyError(f"{where} is not a usable PEM private key, or the passphrase is wrong") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise SigningKeyError("unsupported key type: modelseal signs with Ed25519 or ECDSA P-256")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


def generate(algorithm: str = ED25519) -> PemSigner:
    if algorithm == ED25519:
        return PemSigner(ed25519.Ed25519PrivateKey.generate())
    if algorithm == P256:
        return PemSigner(ec.generate_private_key(ec.SECP256R1()))
    raise SigningKeyError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def private_pem(signer: PemSigner, passphrase: bytes | None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return signer._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def read_sign_passphrase(path: Path, confirm: bool = False) -> bytes:
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if not sys.stdin.isatty():
        raise SigningKeyError(f"{path} is encrypted: set {PASSPHRASE_ENV} or run in a terminal")
    first = getpass.getpass(f"passphrase for {path}: ")
    if confirm and getpass.getpass("repeat passphrase: ") != first:
        raise SigningKeyError("the passphrases do not match")
    return first.encode()


def _read_key_file(path: Path) -> bytes:
    try:
        return read_limited(path, MAX_KEY_FILE, SigningKeyError, f"the key file {path}")
    except FileNotFoundError:
        raise SigningKeyError(f"the key file {path} does not exist") from None


# --- DSSE v1 (https://github.com/secure-systems-lab/dsse) -----------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any, limit: int = 64 << 20) -> bytes:
    """Strict standard base64 (padding required); anything else raises ValueError."""
    if not isinstance(text, str) or len(text) > limit:
        raise ValueError("not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not a base64 string") from None


def sign_envelope(signer: Signer, payload_type: str, payload: bytes, keyid: str | None = None) -> dict[str, Any]:
    sig = signer.sign(pae(payload_type, payload))
    kid = signer.public.key_id if keyid is None else keyid
    return {"payload": b64(payload), "payloadType": payload_type, "signatures": [{"keyid": kid, "sig": b64(sig)}]}


@dataclass(frozen=True)
class EnvelopeSig:
    keyid: str
    sig: bytes


def parse_envelope(env: Any, payload_type: str) -> tuple[bytes, list[EnvelopeSig]]:
    """Structurally check a DSSE envelope of the expected payload type (ValueError if not)."""
    if not isinstance(env, dict) or env.get("payloadType") != payload_type:
        raise ValueError("not a DSSE envelope of the expected type")
    payload = unb64(env.get("payload"))
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not 1 <= len(sigs) <= 16:
        raise ValueError("a DSSE envelope needs 1 to 16 signatures")
    out: list[EnvelopeSig] = []
    for s in sigs:
        if not isinstance(s, dict) or not isinstance(s.get("keyid", ""), str):
            raise ValueError("malformed DSSE signature")
        out.append(EnvelopeSig(s.get("keyid", ""), unb64(s.get("sig"), 1024)))
    return payload, out


def verify_envelope(
    payload_type: str, payload: bytes, sigs: list[EnvelopeSig], keys: Mapping[str, VerifyKey]
) -> list[tuple[VerifyKey, bytes]]:
    """The (key, signature) pairs that verify under ``keys`` (by key id, else every key)."""
    data = pae(payload_type, payload)
    good: list[tuple[VerifyKey, bytes]] = []
    for s in sigs:
        candidates = [keys[s.keyid]] if s.keyid in keys else list(keys.values())
        for k in candidates:
            if k.verify(s.sig, data):
                good.append((k, s.sig))
                break
    return good
