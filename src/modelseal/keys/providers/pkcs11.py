"""``pkcs11:`` provider: KEKs inside an HSM or token, through ``python-pkcs11``.

Key URI (RFC 7512): ``pkcs11:token=LABEL;object=KEYLABEL`` with optional query
attributes ``?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/path``.
Otherwise the module comes from ``MODELSEAL_PKCS11_MODULE`` and the PIN from
``MODELSEAL_PKCS11_PIN``. A recipient records only the path part (token and
object), so hosts with different module paths or PIN files open the same artifact.
A recipient read from an artifact can never choose the module or the PIN, and with
``MODELSEAL_PKCS11_TOKENS`` set it can only name the tokens listed there (so the
operator's PIN is never presented to another token, whose retry counter it would spend).

``key create`` generates a sensitive, non-extractable AES-256 key *in the token*.
Each key version is a separate object with the same label and ``CKA_ID`` = the
version (4 bytes, big-endian). Wrapping is AES-GCM performed by the token with a
random 96-bit IV and the key name, version and encryption context as associated
data; the KEK never leaves the token. Logged-in sessions are pooled (a login
costs about 0.7 ms, a wrap about 30 us on SoftHSM).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError
from modelseal.format.header import Recipient, encode_context
from modelseal.keys.providers.base import KeyInfo, KeyVersionInfo


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str
    object: str
    module: str | None
    pin_source: str | None

    @property
    def key_id(self) -> str:
        """What a recipient records: token and object only, percent-encoded (RFC 7512)."""
        return f"token={quote(self.token, safe='')};object={quote(self.object, safe='')}"


def parse_uri(name: str, *, from_artifact: bool = False) -> Pkcs11Uri:
    """Parse the part after ``pkcs11:`` (RFC 7512 path and query attributes).

    ``from_artifact=True`` is for a recipient read from an artifact, which is
    untrusted until a key opens it: only ``token`` and ``object`` are accepted
    there. The module to load and the PIN come from the operator (environment or
    the key URI typed on the command line), never from an artifact.
    """
    path, sep, query = name.partition("?")
    if from_artifact and sep:
        raise DecryptionError()
    attrs: dict[str, str] = {}
    for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
        k, eq, v = part.partition("=")
        k = k.strip().lower()
        if not eq or k in attrs:
            raise KeyProviderError(f"invalid pkcs11 URI attribute {part!r}")
        attrs[k] = unquote(v)
    allowed = {"token", "object"} if from_artifact else {"token", "object", "module-path", "pin-source"}
    if "token" not in attrs or "object" not in attrs or set(attrs) - allowed:
        if from_artifact:
            raise DecryptionError()
        raise KeyProviderError("a pkcs11 key URI needs token= and object=, and may add ?module-path=&pin-source=")
    return Pkcs11Uri(attrs["token"], attrs["object"], attrs.get("module-path"), attrs.get("pin-source"))


def allowed_tokens() -> set[str] | None:
    """Token labels a recipient read from an artifact may name (``MODELSEAL_PKCS11_TOKENS``,
    comma-separated), or None when the operator has not restricted them."""
    raw = os.environ.get("MODELSEAL_PKCS11_TOKENS")
    if raw is None:
        return None
    return {t.strip() for t in raw.split(",") if t.strip()}


def _pin(uri: Pkcs11Uri) -> str:
    if uri.pin_source:
        src = Path(uri.pin_source.removeprefix("file:"))
        if not src.is_file():
            raise KeyProviderError("pkcs11: pin-source must name a regular file")
        pin = src.read_text(encoding="utf-8")[:256].strip()
    else:
        pin = os.environ.get("MODELSEAL_PKCS11_PIN", "")
    if not pin:
        raise KeyProviderError("pkcs11: no PIN: set MODELSEAL_PKCS11_PIN or pin-source= in the key URI")
    return pin


def _aad(uri: Pkcs11Uri, version: int, context: tuple[tuple[str, str], ...]) -> bytes:
    return (
        b"modelseal/pkcs11/v1\x00"
        + uri.key_id.encode()
        + b"\x00"
        + struct.pack(">I", version)
        + encode_context(context)
    )


class _Token:
    """One logged-in session on one token, used by one thread at a time.

    python-pkcs11 initialises modules without the OS-locking flag (it tells the
    module it will not be called from several threads) and releases the GIL on
    every call, so concurrent calls into a module crash some modules (SoftHSM
    segfaults, measured). Every call therefore holds its module's lock; HSM
    operations are short (a SoftHSM wrap takes about 30 us). The session stays
    open (and logged in) for the life of the process: closing the session that
    logged in would log the whole application out.
    """

    def __init__(self, module: str, token_label: str, pin: str, lock: threading.Lock) -> None:
        import pkcs11

        self._lock = lock

        try:
            self._token = pkcs11.lib(module).get_token(token_label=token_label)
        except pkcs11.exceptions.NoSuchToken:
            raise KeyNotFound(f"pkcs11: no token labelled {token_label!r}") from None
        try:
            self._session = self._token.open(rw=True, user_pin=pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            self._session = self._token.open(rw=True)  # login is per application: share it
        except pkcs11.exceptions.PinIncorrect:
            raise KeyProviderError("pkcs11: wrong PIN for the token") from None
        except pkcs11.exceptions.PinLocked:
            raise KeyProviderError("pkcs11: the token's PIN is locked") from None

    @contextmanager
    def session(self) -> Iterator[Any]:
        with self._lock:
            yield self._session


_TOKENS: dict[tuple[str, str, str], _Token] = {}
_MODULE_LOCKS: dict[str, threading.Lock] = {}
_TOKENS_LOCK = threading.Lock()


class Pkcs11Provider:
    scheme = "pkcs11"

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now

    def _pool(self, uri: Pkcs11Uri) -> _Token:
        module = uri.module or os.environ.get("MODELSEAL_PKCS11_MODULE")
        if not module:
            raise KeyProviderError("pkcs11: no module: set MODELSEAL_PKCS11_MODULE or module-path= in the key URI")
        pin_origin = uri.pin_source or "env"
        with _TOKENS_LOCK:
            tok = _TOKENS.get((module, uri.token, pin_origin))
            if tok is None:
                # Stored only once the login worked: a wrong PIN is not remembered.
                lock = _MODULE_LOCKS.setdefault(module, threading.Lock())
                with lock:
                    tok = _Token(module, uri.token, _pin(uri), lock)
                _TOKENS[(module, uri.token, pin_origin)] = tok
            return tok

    @staticmethod
    def _versions(session: Any, uri: Pkcs11Uri) -> dict[int, Any]:
        from pkcs11 import Attribute, ObjectClass

        out: dict[int, Any] = {}
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: uri.object}):
            raw_id = obj[Attribute.ID]
            if len(raw_id) == 4:
                out[struct.unpack(">I", raw_id)[0]] = obj
        if not out:
            raise KeyNotFound(f"pkcs11: no key {uri.object!r} on token {uri.token!r}")
        return out

    # -- wrap / unwrap -------------------------------------------------
    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        from pkcs11 import Attribute, KeyType, Mechanism
        from pkcs11.mechanisms import GCMParams

        uri = parse_uri(name)
        with self._pool(uri).session() as s:
            versions = self._versions(s, uri)
            version = max(versions)
            key = versions[version]
            if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE] or key[Attribute.KEY_TYPE] != KeyType.AES:
                raise KeyProviderError(f"pkcs11:{uri.key_id} must be a sensitive, non-extractable AES key")
            if not key[Attribute.ENCRYPT]:
                raise KeyDisabled(f"newest version {version} of pkcs11:{uri.key_id} is disabled; rotate the key first")
            iv = os.urandom(12)
            ct = key.encrypt(
                dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, _aad(uri, version, context))
            )
        return Recipient("pkcs11", uri.key_id, version, iv + bytes(ct))

    def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
        import pkcs11
        from pkcs11 import Attribute, Mechanism
        from pkcs11.mechanisms import GCMParams

        uri = parse_uri(recipient.key_id, from_artifact=True)
        w = recipient.wrapped
        if len(w) != 12 + 32 + 16:
            raise DecryptionError()
        tokens = allowed_tokens()
        if tokens is not None and uri.token not in tokens:
            raise KeyNotFound("pkcs11: the recipient names a token not listed in MODELSEAL_PKCS11_TOKENS")
        with self._pool(uri).session() as s:
            key = self._versions(s, uri).get(recipient.key_version)
            if key is None:
                raise KeyNotFound(f"pkcs11:{uri.key_id} has no version {recipient.key_version} (destroyed?)")
            if not key[Attribute.DECRYPT]:
                raise KeyDisabled(f"version {recipient.key_version} of pkcs11:{uri.key_id} is disabled")
            aad = _aad(uri, recipient.key_version, context)
            try:
                dek = key.decrypt(w[12:], mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(w[:12], aad))
            except (
                pkcs11.exceptions.EncryptedDataInvalid,
                pkcs11.exceptions.FunctionFailed,
                pkcs11.exceptions.DataInvalid,
                pkcs11.exceptions.GeneralError,  # SoftHSM's answer to a GCM tag mismatch
            ):
                raise DecryptionError() from None
        if len(dek) != 32:
            raise DecryptionError()
        return bytes(dek)

    # -- lifecycle -----------------------------------------------------
    def _generate(self, s: Any, uri: Pkcs11Uri, version: int) -> None:
        from pkcs11 import Attribute, KeyType

        s.generate_key(
            KeyType.AES,
            256,
            label=uri.object,
            id=struct.pack(">I", version),
            store=True,
            template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
                Attribute.MODIFIABLE: True,
                Attribute.PRIVATE: True,
            },
        )

    def create(self, name: str) -> KeyInfo:
        uri = parse_uri(name)
        with self._pool(uri).session() as s:
            try:
                self._versions(s, uri)
            except KeyNotFound:
                self._generate(s, uri, 1)
            else:
                raise KeyProviderError(f"pkcs11:{uri.key_id} already exists")
            return self._info(s, uri)

    def rotate(self, name: str) -> KeyInfo:
        uri = parse_uri(name)
        with self._pool(uri).session() as s:
            self._generate(s, uri, max(self._versions(s, uri)) + 1)
            return self._info(s, uri)

    def set_version_state(self, name: str, version: int, state: str) -> KeyInfo:
        from pkcs11 import Attribute

        uri = parse_uri(name)
        with self._pool(uri).session() as s:
            key = self._versions(s, uri).get(version)
            if key is None:
                raise KeyNotFound(f"pkcs11:{uri.key_id} has no version {version}")
            on = state == "active"
            key[Attribute.ENCRYPT] = on
            key[Attribute.DECRYPT] = on
            return self._info(s, uri)

    def destroy(self, name: str, version: int | None) -> KeyInfo:
        """Destroy key objects in the token (crypto-shredding)."""
        uri = parse_uri(name)
        with self._pool(uri).session() as s:
            versions = self._versions(s, uri)
            targets = [version] if version is not None else list(versions)
            for v in targets:
                if v not in versions:
                    raise KeyNotFound(f"pkcs11:{uri.key_id} has no version {v}")
                versions[v].destroy()
            try:
                return self._info(s, uri)
            except KeyNotFound:
                return KeyInfo(f"pkcs11:{uri.key_id}", tuple(KeyVersionInfo(v, 0.0, "destroyed") for v in targets), 1)

    def _info(self, s: Any, uri: Pkcs11Uri) -> KeyInfo:
        from pkcs11 import Attribute

        versions = self._versions(s, uri)
        rows = tuple(
            KeyVersionInfo(v, 0.0, "active" if versions[v][Attribute.DECRYPT] else "disabled") for v in sorted(versions)
        )
        return KeyInfo(f"pkcs11:{uri.key_id}", rows, 1)

    def info(self, name: str) -> KeyInfo:
        uri = parse_uri(name)
        with self._pool(uri).session() as s:
            return self._info(s, uri)

    def list(self) -> list[KeyInfo]:
        raise KeyProviderError("pkcs11: list keys with: modelseal key list pkcs11:token=LABEL;object=NAME")
