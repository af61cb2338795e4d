"""Public-key pins of the issuing CA, RFC 7469 style: base64 of the SHA-256 of the
SubjectPublicKeyInfo (DER).

A pin set is refused unless it holds at least one *backup* pin: a key that is in no
certificate of the live chain (the CA's standby intermediate key, ``CA.next_public``),
so the intermediate can be rolled over to it without locking clients out. A chain is
accepted when one of its CA certificates matches a pin. Comparisons are constant-time
and never stop early.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from modelseal.errors import CertificateError

PIN_BYTES = 32


class PinMismatch(CertificateError):
    """No CA certificate of the presented chain matches a pin: a security event."""


def pin_of_key(public: PublicKeyTypes) -> str:
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def pin_of(cert: x509.Certificate) -> str:
    return pin_of_key(cert.public_key())


def parse_pin(text: str) -> bytes:
    """A pin's 32 bytes (``sha256/`` prefix allowed, as in HPKP); raises ``CertificateError``."""
    t = text.strip().removeprefix("sha256/")
    try:
        raw = base64.b64decode(t, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != PIN_BYTES:
        raise CertificateError("a pin is the base64 SHA-256 of a SubjectPublicKeyInfo (44 characters)")
    return raw


def _in(digest: bytes, pins: Iterable[bytes]) -> bool:
    found = False
    for p in pins:
        found |= hmac.compare_digest(digest, p)  # every pin compared: no early exit
    return found


def check_pins(pins: Sequence[str], chain: Sequence[x509.Certificate]) -> str:
    """Accept ``chain`` (leaf first) under ``pins``: the pin set must hold a backup pin (one
    matching no certificate of the chain) and a CA certificate of the chain must match a pin.
    Returns the matching pin; raises ``CertificateError`` for a bad pin set, ``PinMismatch``
    for a chain no pin matches."""
    raw = [parse_pin(p) for p in pins]
    if not raw:
        raise CertificateError("no pins given")
    chain_digests = [base64.b64decode(pin_of(c)) for c in chain]
    if all(_in(p, chain_digests) for p in raw):
        raise CertificateError(
            "the pin set has no backup pin: add the pin of the CA's standby key ('modelseal ca pins'), "
            "or a roll-over of the intermediate locks these clients out"
        )
    matched = None
    for cert, digest in zip(chain[1:], chain_digests[1:], strict=True):  # CA certificates, not the leaf
        if _in(digest, raw) and matched is None:
            matched = pin_of(cert)
    if matched is None:
        raise PinMismatch("the server's CA matches none of the pinned keys: refusing the connection")
    return matched


__all__ = ["PinMismatch", "check_pins", "parse_pin", "pin_of", "pin_of_key"]
