"""The signature of alert webhooks (docs/monitoring.md, "Alerts"): Ed25519 over ``b"<t>." + body``.

The sender (``telemetry.webhook``) adds two headers to each POST:

- ``Modelseal-Signature: t=<unix seconds>,ed25519=<base64 signature>``, the signature over
  the ASCII decimal ``t``, a dot and the exact body bytes. ``t`` is the time of the attempt,
  so a retry carries a fresh one; the alert's ``id`` in the body stays the same, for the
  receiver to drop a duplicate.
- ``Modelseal-Key-Id: <first 16 hex digits of SHA-256 of the raw 32-byte public key>``,
  which names the key for people and error messages; it never chooses one.

A receiver calls ``verify_webhook`` with every public key it trusts (two during a key
change): it refuses a body no trusted key signed, a ``t`` outside ``tolerance`` seconds of
its clock (a replay), and a body that is not an alert. The signing key is a PKCS#8 PEM file
that only its owner may read (``modelseal alerts keygen``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelseal.errors import SigningKeyError, WebhookSignatureError
from modelseal.keys.config import ConfigError
from modelseal.util.bounded import json_loads
from modelseal.util.files import write_atomic

SIGNATURE_HEADER = "Modelseal-Signature"
KEY_ID_HEADER = "Modelseal-Key-Id"
ALERT_SCHEMA = "modelseal.alert/v1"
DEFAULT_TOLERANCE = 300  # seconds either side of the receiver's clock
MAX_BODY = 1 << 20  # an alert is a few hundred bytes
MAX_HEADER = 1024
MAX_KEY_FILE = 1 << 14
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def generate_signing_key(path: Path, *, force: bool = False) -> Ed25519PrivateKey:
    """A new key in ``path`` (mode 0600, written atomically); refused if ``path`` exists
    unless ``force``."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if not path.parent.is_dir():
        raise ConfigError(f"alerts: folder {path.parent} does not exist")
    try:
        write_atomic(path, pem, mode=0o600, exclusive=not force)
    except FileExistsError:
        raise ConfigError(f"alerts: {path} already exists (use --force to replace it)") from None
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The webhook signing key: a regular file, owned by this user (or root), readable by
    its owner only, holding an unencrypted PKCS#8 Ed25519 key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"alerts: cannot open the webhook signing key {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"alerts: the webhook signing key {path} is not a regular file")
        if st.st_mode & 0o077 or st.st_uid not in (os.getuid(), 0):
            raise ConfigError(
                f"alerts: the webhook signing key {path} must be owned by this user and readable by it only (chmod 600)"
            )
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None) if len(data) <= MAX_KEY_FILE else None
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"alerts: {path} is not an unencrypted Ed25519 private key (modelseal alerts keygen)")
    return key


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its PEM (what ``alerts keygen`` prints)."""
    try:
        key = serialization.load_pem_public_key(data) if len(data) <= MAX_KEY_FILE else None
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError("not an Ed25519 public key in PEM (the output of modelseal alerts keygen)")
    return key


def signed_message(t: int, body: bytes) -> bytes:
    return b"%d." % t + body


def signature_headers(key: Ed25519PrivateKey, body: bytes, now: float | None = None) -> dict[str, str]:
    """The two headers of one delivery attempt of ``body``."""
    t = int(time.time() if now is None else now)
    sig = base64.b64encode(key.sign(signed_message(t, body))).decode()
    return {SIGNATURE_HEADER: f"t={t},ed25519={sig}", KEY_ID_HEADER: key_id(key.public_key())}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    found = [v for k, v in headers.items() if k.lower() == name.lower()]
    if len(found) > 1:
        raise WebhookSignatureError(f"webhook refused: {name} appears more than once")
    return found[0] if found else None


def parse_signature(value: str) -> tuple[int, list[bytes]]:
    """``t`` and the signatures of a ``Modelseal-Signature`` value; refused unless it is
    exactly one ``t=DIGITS`` and one to four ``ed25519=BASE64`` (64 bytes each)."""
    if len(value) > MAX_HEADER:
        raise WebhookSignatureError("webhook refused: the signature header is too long")
    stamps: list[str] = []
    sigs: list[bytes] = []
    for part in value.split(","):
        name, sep, text = part.strip().partition("=")
        if name == "t" and sep and text.isdigit() and len(text) <= 12 and text.isascii():
            stamps.append(text)
            continue
        if name == "ed25519" and sep:
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) == 64:
                sigs.append(raw)
                continue
        raise WebhookSignatureError("webhook refused: the signature header is malformed")
    if len(stamps) != 1 or not 1 <= len(sigs) <= 4:
        raise WebhookSignatureError("webhook refused: the signature header needs one t= and an ed25519= signature")
    return int(stamps[0]), sigs


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    public_key: Ed25519PublicKey | Sequence[Ed25519PublicKey],
    now: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """The alert (the parsed body) of a delivery that a trusted key signed within
    ``tolerance`` seconds of ``now``; ``WebhookSignatureError`` otherwise."""
    keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)
    if not keys:
        raise WebhookSignatureError("webhook refused: no trusted public key given")
    if len(body) > MAX_BODY:
        raise WebhookSignatureError("webhook refused: the body is too large for an alert")
    value = _header(headers, SIGNATURE_HEADER)
    if value is None:
        raise WebhookSignatureError(f"webhook refused: no {SIGNATURE_HEADER} header")
    t, sigs = parse_signature(value)
    message = signed_message(t, body)
    if not any(_verifies(k, s, message) for k in keys for s in sigs):
        claimed = _header(headers, KEY_ID_HEADER) or ""
        trusted = [key_id(k) for k in keys]
        if _KEY_ID.fullmatch(claimed) and not any(hmac.compare_digest(claimed, i) for i in trusted):
            raise WebhookSignatureError(f"webhook refused: signed by key {claimed}, not a trusted key")
        raise WebhookSignatureError("webhook refused: the signature does not match the body (tampered, or another key)")
    clock = time.time() if now is None else now
    if abs(clock - t) > tolerance:
        when = f"{int(clock - t)} s ago" if clock > t else f"{int(t - clock)} s ahead of this clock"
        raise WebhookSignatureError(
            f"webhook refused: signed {when}, outside the {int(tolerance)} s window (a replay?)"
        )
    doc = json_loads(
        body,
        max_depth=4,
        max_values=4096,
        error=lambda why: WebhookSignatureError(f"webhook refused: {why}"),
        what="the body",
    )
    if not isinstance(doc, dict) or doc.get("schema") != ALERT_SCHEMA:
        raise WebhookSignatureError(f"webhook refused: the body is not a {ALERT_SCHEMA} alert")
    return doc


def _verifies(key: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        key.verify(sig, message)
    except InvalidSignature:
        return False
    return True


__all__ = [
    "ALERT_SCHEMA",
    "DEFAULT_TOLERANCE",
    "KEY_ID_HEADER",
    "SIGNATURE_HEADER",
    "generate_signing_key",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "parse_signature",
    "public_pem",
    "signature_headers",
    "verify_webhook",
]
