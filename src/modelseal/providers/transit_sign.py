"""A ``Signer`` backed by an OpenBao/Vault Transit signing key (docs/signing.md).

The private key never leaves the server: ``sign`` sends the DSSE pre-authentication
encoding to ``MOUNT/sign/NAME`` and gets the signature back. Key types: ``ed25519``
and ``ecdsa-p256`` (SHA-256, DER), the two modelseal verifies. The signature and the
public key are pinned to one key version, read when the signer is made. Connection,
credentials, the loopback rule and the mount allow-list are the transit provider's.
"""

from __future__ import annotations

import base64
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import KeyProviderError, SigningKeyError
from ..signing import ED25519, P256, VerifyKey
from .transit import TransitProvider, _split

_TYPES = {ED25519: "ed25519", P256: "ecdsa-p256"}


class TransitSigner:
    """``transit:[MOUNT/]NAME`` as a signing key."""

    def __init__(self, name: str, provider: TransitProvider | None = None) -> None:
        self._provider = provider or TransitProvider()
        self._mount, self._key = _split(name)
        doc = self._provider._call(
            "read signing key", lambda c: c.secrets.transit.read_key(name=self._key, mount_point=self._mount)
        )
        data = doc["data"]
        ktype = data.get("type")
        if ktype not in _TYPES.values():
            raise SigningKeyError(f"transit key {name!r} is {ktype!r}; signing needs ed25519 or ecdsa-p256")
        self._version = int(data["latest_version"])
        material = data["keys"][str(self._version)]
        pub = material.get("public_key") if isinstance(material, dict) else None
        if not pub:
            raise SigningKeyError(f"transit key {name!r} has no public key")
        if ktype == "ed25519":
            self.public = VerifyKey.from_public(ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(pub)))
        else:
            self.public = VerifyKey.from_pem(pub.encode(), f"transit key {name}")
        self._type = ktype

    def sign(self, data: bytes) -> bytes:
        args: dict[str, Any] = {
            "name": self._key,
            "hash_input": base64.b64encode(data).decode(),
            "key_version": self._version,
            "mount_point": self._mount,
        }
        if self._type == "ecdsa-p256":
            args.update(hash_algorithm="sha2-256", marshaling_algorithm="asn1")
        doc = self._provider._call("sign", lambda c: c.secrets.transit.sign_data(**args))
        sig = str(doc["data"]["signature"])
        prefix = f"vault:v{self._version}:"
        if not sig.startswith(prefix):
            raise KeyProviderError("transit: the server signed with another key version")
        out = base64.b64decode(sig[len(prefix) :])
        if not self.public.verify(out, data):  # never hand out a signature that does not verify
            raise KeyProviderError("transit: the server's signature does not verify")
        return out


def create_signing_key(name: str, algorithm: str, provider: TransitProvider | None = None) -> TransitSigner:
    """Create a non-exportable Transit signing key and return its signer."""
    if algorithm not in _TYPES:
        raise SigningKeyError(f"unknown algorithm {algorithm!r}")
    prov = provider or TransitProvider()
    mount, key = _split(name)
    prov._call(
        "create signing key",
        lambda c: c.secrets.transit.create_key(
            name=key, key_type=_TYPES[algorithm], exportable=False, mount_point=mount
        ),
        idempotent=False,
    )
    return TransitSigner(name, prov)
