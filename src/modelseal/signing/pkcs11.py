"""A ``Signer`` backed by an ECDSA P-256 key pair inside a PKCS#11 token (docs/signing.md).

``pkcs11:token=LABEL;object=KEYLABEL`` names a key pair made by
``modelseal signing-key pkcs11:...``: a sensitive, non-extractable private key
that can only sign, and its public key, both with that label. The token hashes
nothing: modelseal sends SHA-256 of the DSSE encoding to ``CKM_ECDSA`` and
DER-encodes the (r, s) it returns. Module, PIN and locking are the ``pkcs11:``
provider's (``MODELSEAL_PKCS11_MODULE``, ``MODELSEAL_PKCS11_PIN``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelseal.errors import KeyNotFound, KeyProviderError, SigningKeyError
from modelseal.keys.providers.pkcs11 import Pkcs11Provider, parse_uri
from modelseal.signing.signers import P256, VerifyKey


class Pkcs11Signer:
    def __init__(self, name: str, provider: Pkcs11Provider | None = None) -> None:
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        self._uri = parse_uri(name)
        self._tok = (provider or Pkcs11Provider())._pool(self._uri)
        with self._tok.session() as s:
            label = {Attribute.LABEL: self._uri.object, Attribute.KEY_TYPE: KeyType.EC}
            pubs = list(s.get_objects({**label, Attribute.CLASS: ObjectClass.PUBLIC_KEY}))
            privs = list(s.get_objects({**label, Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            if len(pubs) != 1 or len(privs) != 1:
                raise KeyNotFound(f"pkcs11: no single EC key pair {self._uri.object!r} on token {self._uri.token!r}")
            self._priv: Any = privs[0]
            if not self._priv[Attribute.SENSITIVE] or self._priv[Attribute.EXTRACTABLE]:
                raise SigningKeyError(f"pkcs11: the private key {self._uri.object!r} is extractable; refusing it")
            der = encode_ec_public_key(pubs[0])
        self.public = VerifyKey.from_pem(_pem(der), f"pkcs11 key {self._uri.object}")
        if self.public.algorithm != P256:
            raise SigningKeyError("pkcs11 signing keys must be ECDSA P-256")

    def sign(self, data: bytes) -> bytes:
        import pkcs11
        from pkcs11 import Mechanism

        digest = hashlib.sha256(data).digest()
        try:
            with self._tok.session():
                raw = self._priv.sign(digest, mechanism=Mechanism.ECDSA)
        except pkcs11.exceptions.PKCS11Error as e:
            raise KeyProviderError(f"pkcs11: the token refused to sign ({type(e).__name__})") from None
        half = len(raw) // 2
        sig = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        if not self.public.verify(sig, data):
            raise KeyProviderError("pkcs11: the token's signature does not verify")
        return sig


def _pem(der: bytes) -> bytes:
    import base64
    import textwrap

    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n".encode()


def create_signing_key(name: str, algorithm: str, provider: Pkcs11Provider | None = None) -> Pkcs11Signer:
    """Generate a P-256 key pair in the token: the private half sensitive, non-extractable, sign-only."""
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    if algorithm != P256:
        raise SigningKeyError("pkcs11 signing keys are ECDSA P-256 (--algorithm ecdsa-p256-sha256)")
    prov = provider or Pkcs11Provider()
    uri = parse_uri(name)
    tok = prov._pool(uri)
    with tok.session() as s:
        label = {Attribute.LABEL: uri.object, Attribute.KEY_TYPE: KeyType.EC}
        if list(s.get_objects({**label, Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
            raise SigningKeyError(f"pkcs11: token {uri.token!r} already has a key pair {uri.object!r}")
        params = s.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        params.generate_keypair(
            store=True,
            label=uri.object,
            public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
            private_template={
                Attribute.SIGN: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
            },
        )
    return Pkcs11Signer(name, prov)
