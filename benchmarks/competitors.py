"""Encrypted-checkpoint competitors for benchmarks/load.py, each behind the same three calls.

Only what installs here is measured; see ``available()`` and ``missing()``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Competitor:
    name: str
    save: Callable[[dict[str, Any], str], None]
    load_all: Callable[[str], dict[str, Any]]
    load_one: Callable[[str, str], Any] | None

    def names_in_clear(self, path: str, ref: dict[str, Any]) -> bool:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        return any(k.encode() in head for k in ref)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cryptotensors() -> Competitor:
    """CryptoTensors 0.2.3: per-tensor AES-256-GCM inside a safetensors layout; it insists
    on a signing key at save time. Key material is a raw 32-byte key (JWK-like dict)."""
    import base64
    import secrets

    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptotensors import safe_open
    from cryptotensors.torch import save_file

    sk = ed25519.Ed25519PrivateKey.generate()
    config = {
        "enc_key": {
            "kty": "oct",
            "alg": "aes256gcm",
            "kid": "bench-enc",
            "k": base64.b64encode(secrets.token_bytes(32)).decode(),
        },
        "sign_key": {
            "kty": "okp",
            "alg": "ed25519",
            "kid": "bench-sign",
            "d": base64.b64encode(
                sk.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
            ).decode(),
            "x": base64.b64encode(sk.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)).decode(),
        },
    }

    def load_all(path: str) -> dict[str, Any]:
        with safe_open(path, framework="pt", device="cpu", config=config) as f:
            return {k: f.get_tensor(k) for k in f.offset_keys()}

    def load_one(path: str, name: str) -> Any:
        with safe_open(path, framework="pt", device="cpu", config=config) as f:
            return f.get_tensor(name)

    return Competitor("cryptotensors", lambda t, p: save_file(t, p, config=config), load_all, load_one)


def _tensorizer() -> Competitor:
    """tensorizer 2.12.1 with libsodium encryption, raw 32-byte key (no KDF in the loop)."""
    import os

    from tensorizer import DecryptionParams, EncryptionParams, TensorDeserializer, TensorSerializer

    key = os.urandom(32)

    def save(tensors: dict[str, Any], path: str) -> None:
        s = TensorSerializer(path, encryption=EncryptionParams(key))
        s.write_state_dict(tensors)
        s.close()

    def load_all(path: str) -> dict[str, Any]:
        with TensorDeserializer(path, device="cpu", encryption=DecryptionParams.from_key(key)) as d:
            return {k: d[k].detach() for k in d.keys()}  # noqa: SIM118

    def load_one(path: str, name: str) -> Any:
        with TensorDeserializer(path, device="cpu", encryption=DecryptionParams.from_key(key), lazy_load=True) as d:
            return d[name].detach()

    return Competitor("tensorizer", save, load_all, load_one)


def available() -> list[Competitor]:
    out = []
    if _have("cryptotensors"):
        out.append(_cryptotensors())
    if _have("tensorizer"):
        out.append(_tensorizer())
    return out


def missing() -> list[str]:
    return [m for m in ("cryptotensors", "tensorizer") if not _have(m)]
