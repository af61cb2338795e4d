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

from modelseal.errors import KeyNotFound, KeyProviderError, SigningKeyError
from modelseal.keys.providers.transit import TransitProvider, split_name
from modelseal.signing.signers import ED25519, P256, VerifyKey

_TYPES = {ED25519: "ed25519", P256: "ecdsa-p256"}


class TransitSigner:
    """``transit:[MOUNT/]NAME`` as a signing key."""

    def __init__(self, name: str, provider: TransitProvider | None = None) -> None:
        self._provider = provider or TransitProvider()
        self._mount, self._key = split_name(name)
        data = _read_key(self._provider, self._mount, self._key)
        ktype = data.get("type")
        if ktype not in _TYPES.values():
            raise SigningKeyError(f"transit key {name!r} is {ktype!r}; signing needs ed25519 or ecdsa-p256")
        if data.get("exportable") or data.get("allow_plaintext_backup"):
            raise SigningKeyError(f"transit key {name!r} is exportable: a signing key must never leave the server")
        try:
            self._version = int(data["latest_version"])
            pub = data["keys"][str(self._version)]["public_key"]
            if ktype == "ed25519":
                raw = base64.b64decode(pub, validate=True)
                self.public = VerifyKey.from_public(ed25519.Ed25519PublicKey.from_public_bytes(raw))
            else:
                self.public = VerifyKey.from_pem(str(pub).encode(), f"transit key {name}")
        except (KeyError, TypeError, ValueError):
            raise KeyProviderError(f"transit: the server's description of key {name!r} is malformed") from None
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
        try:
            sig = str(doc["data"]["signature"])
            prefix = f"vault:v{self._version}:"
            if not sig.startswith(prefix):
                raise KeyProviderError("transit: the server signed with another key version")
            out = base64.b64decode(sig[len(prefix) :], validate=True)
        except (KeyError, TypeError, ValueError):
            raise KeyProviderError("transit: the server's signature reply is malformed") from None
        if not self.public.verify(out, data):  # never hand out a signature that does not verify
            raise KeyProviderError("transit: the server's signature does not verify")
        return out


def create_signing_key(name: str, algorithm: str, provider: TransitProvider | None = None) -> TransitSigner:
    """Create a non-exportable Transit signing key and return its signer."""
    if algorithm not in _TYPES:
        raise SigningKeyError(f"unknown algorithm {algorithm!r}")
    prov = provider or TransitProvider()
    mount, key = split_name(name)
    try:
        _read_key(prov, mount, key)
    except KeyNotFound:
        pass
    else:  # Transit's create is a silent no-op on an existing key, whatever its settings
        raise SigningKeyError(f"transit key {name!r} already exists; use it with --sign-key transit:{name}")
    prov._call(
        "create signing key",
        lambda c: c.secrets.transit.create_key(
            name=key, key_type=_TYPES[algorithm], exportable=False, mount_point=mount
        ),
        idempotent=False,
    )
    signer = TransitSigner(name, prov)
    if signer._type != _TYPES[algorithm]:
        raise SigningKeyError(f"transit key {name!r} was created as {signer._type}, not {_TYPES[algorithm]}")
    return signer


def _read_key(provider: TransitProvider, mount: str, key: str) -> dict[str, Any]:
    doc = provider._call("read signing key", lambda c: c.secrets.transit.read_key(name=key, mount_point=mount))
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise KeyProviderError("transit: the server's key description is malformed")
    return data
