"""``pkcs11:`` provider: KEKs inside an HSM or token, through ``python-pkcs11``.

Key URI (RFC 7512): ``pkcs11:token=LABEL;object=KEYLABEL`` with optional query
attributes ``?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/path``.
Otherwise the module comes from ``MODELSEAL_PKCS11_MODULE`` and the PIN from
``MODELSEAL_PKCS11_PIN``. A recipient records only the path part (token and
object), so hosts with different module paths or PIN files open the same artifact.

``key create`` generates a sensitive, non-extractable AES-256 key *in the token*.
Each key version is a separate object with the same label and ``CKA_ID`` = the
version (4 bytes, big-endian). Wrapping is AES-GCM performed by the token with a
random 96-bit IV and the key name, version and encryption context as associated
data; the KEK never leaves the token. Logged-in sessions are pooled (a login
costs about 0.7 ms, a wrap about 30 us on SoftHSM).
"""

from __future__ import annotations

import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from ..errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError
from ..header import Recipient, encode_context
from . import KeyInfo, KeyVersionInfo

POOL_SIZE = 4


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str
    object: str
    module: str | None
    pin_source: str | None

    @property
    def key_id(self) -> str:
        return f"token={self.token};object={self.object}"


def parse_uri(name: str) -> Pkcs11Uri:
    """Parse the part after ``pkcs11:`` (RFC 7512 path and query attributes)."""
    path, _, query = name.partition("?")
    attrs: dict[str, str] = {}
    for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
        k, sep, v = part.partition("=")
        if not sep:
            raise KeyProviderError(f"invalid pkcs11 URI attribute {part!r}")
        attrs[k.strip().lower()] = unquote(v)
    if "token" not in attrs or "object" not in attrs:
        raise KeyProviderError("a pkcs11 key URI needs token= and object= (RFC 7512)")
    return Pkcs11Uri(attrs["token"], attrs["object"], attrs.get("module-path"), attrs.get("pin-source"))


def _pin(uri: Pkcs11Uri) -> str:
    if uri.pin_source:
        src = uri.pin_source.removeprefix("file:")
        with open(src, encoding="utf-8") as f:
            return f.read().strip()
    pin = os.environ.get("MODELSEAL_PKCS11_PIN")
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


class _SessionPool:
    """Logged-in read/write sessions on one token, reused across calls and threads."""

    def __init__(self, module: str, token_label: str, pin: str) -> None:
        import pkcs11

        try:
            self._token = pkcs11.lib(module).get_token(token_label=token_label)
        except pkcs11.exceptions.NoSuchToken:
            raise KeyNotFound(f"pkcs11: no token labelled {token_label!r}") from None
        self._pin = pin
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._count = 0
        self._lock = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[Any]:
        import pkcs11

        try:
            s = self._idle.get_nowait()
        except queue.Empty:
            try:
                s = self._token.open(rw=True, user_pin=self._pin)
            except pkcs11.exceptions.UserAlreadyLoggedIn:
                # PKCS#11 login is per application: a new session shares it.
                s = self._token.open(rw=True)
            except pkcs11.exceptions.PinIncorrect:
                raise KeyProviderError("pkcs11: wrong PIN for the token") from None
            except pkcs11.exceptions.PinLocked:
                raise KeyProviderError("pkcs11: the token's PIN is locked") from None
        try:
            yield s
        except BaseException:
            s.close()  # a session in an unknown state is not returned to the pool
            raise
        if self._idle.qsize() < POOL_SIZE:
            self._idle.put(s)
        else:
            s.close()


_POOLS: dict[tuple[str, str], _SessionPool] = {}
_POOLS_LOCK = threading.Lock()


class Pkcs11Provider:
    scheme = "pkcs11"

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now

    def _pool(self, uri: Pkcs11Uri) -> _SessionPool:
        module = uri.module or os.environ.get("MODELSEAL_PKCS11_MODULE")
        if not module:
            raise KeyProviderError("pkcs11: no module: set MODELSEAL_PKCS11_MODULE or module-path= in the key URI")
        with _POOLS_LOCK:
            pool = _POOLS.get((module, uri.token))
            if pool is None:
                pool = _POOLS[(module, uri.token)] = _SessionPool(module, uri.token, _pin(uri))
            return pool

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
        from pkcs11 import Attribute, Mechanism
        from pkcs11.mechanisms import GCMParams

        uri = parse_uri(name)
        with self._pool(uri).session() as s:
            versions = self._versions(s, uri)
            version = max(versions)
            key = versions[version]
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

        uri = parse_uri(recipient.key_id)
        w = recipient.wrapped
        if len(w) != 12 + 32 + 16:
            raise DecryptionError()
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
