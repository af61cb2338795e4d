"""``local:`` provider: KEKs held in the embedded keystore (``modelseal.keys.keystore``).

Wrapping is AES-256-GCM under the newest active KEK version with a random
96-bit nonce; the associated data binds the key name, the version and the
canonical encryption context, so a wrap made for one context or key cannot
be unwrapped under another.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError
from modelseal.format.header import Recipient, encode_context
from modelseal.keys import keystore
from modelseal.keys.providers.base import KeyInfo, KeyVersionInfo

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _aad(name: str, version: int, context: tuple[tuple[str, str], ...]) -> bytes:
    return (
        b"modelseal/local-wrap/v1\x00" + name.encode() + b"\x00" + struct.pack(">I", version) + encode_context(context)
    )


def _info(name: str, entry: dict[str, Any]) -> KeyInfo:
    versions = tuple(
        KeyVersionInfo(int(v), float(d["created"]), str(d["state"]))
        for v, d in sorted(entry["versions"].items(), key=lambda kv: int(kv[0]))
    )
    return KeyInfo(f"local:{name}", versions, int(entry.get("min_decryption_version", 1)))


def _new_version(now: float) -> dict[str, Any]:
    return {"created": now, "state": "active", "material": base64.b64encode(os.urandom(32)).decode()}


class LocalProvider:
    scheme = "local"

    def __init__(
        self,
        path: Path | None = None,
        passphrase: Callable[[], bytes] = keystore.read_passphrase,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._passphrase = passphrase
        self._now = now

    @property
    def path(self) -> Path:
        """The keystore file: the one given, else ``$MODELSEAL_HOME``'s as of now."""
        return self._path or keystore.keystore_path()

    def _update(self) -> contextlib.AbstractContextManager[keystore.UnlockedKeystore]:
        """A locked keystore update whose save erases what is overdue by this provider's clock."""
        return keystore.locked_update(self.path, self._passphrase, clock=self._now)

    # -- wrap / unwrap -------------------------------------------------
    def _entry(self, keys: dict[str, Any], name: str) -> dict[str, Any]:
        entry = keys.get(name)
        if not isinstance(entry, dict):
            raise KeyNotFound(f"no key local:{name} in the keystore")
        return entry

    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        entry = self._entry(keystore.unlock(self.path, self._passphrase).keys, name)
        version = max(int(v) for v in entry["versions"])
        data = entry["versions"][str(version)]
        if data["state"] != "active":
            raise KeyDisabled(f"newest version {version} of local:{name} is {data['state']}; rotate the key first")
        nonce = os.urandom(12)
        ct = AESGCM(base64.b64decode(data["material"])).encrypt(nonce, dek, _aad(name, version, context))
        return Recipient("local", name, version, nonce + ct)

    def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
        name, version = recipient.key_id, recipient.key_version
        entry = self._entry(keystore.unlock(self.path, self._passphrase).keys, name)
        data = entry["versions"].get(str(version))
        if data is None:
            raise KeyNotFound(f"local:{name} has no version {version}")
        if data["state"] != "active":  # pending-destroy never unwraps, overdue or not, saved or not
            raise KeyDisabled(f"version {version} of local:{name} is {data['state']}")
        if version < int(entry.get("min_decryption_version", 1)):
            raise KeyDisabled(f"version {version} of local:{name} is below the minimum decryption version")
        w = recipient.wrapped
        if len(w) != 12 + 32 + 16:
            raise DecryptionError()
        try:
            return AESGCM(base64.b64decode(data["material"])).decrypt(w[:12], w[12:], _aad(name, version, context))
        except InvalidTag:
            raise DecryptionError() from None

    # -- lifecycle -----------------------------------------------------
    def create(self, name: str) -> KeyInfo:
        if not _NAME.fullmatch(name):
            raise KeyProviderError(f"invalid key name {name!r}: use 1-128 of [A-Za-z0-9._-]")
        with self._update() as ks:
            if name in ks.keys:
                raise KeyProviderError(f"key local:{name} already exists")
            now = self._now()
            ks.keys[name] = {"created": now, "min_decryption_version": 1, "versions": {"1": _new_version(now)}}
            return _info(name, ks.keys[name])

    def rotate(self, name: str) -> KeyInfo:
        with self._update() as ks:
            entry = self._entry(ks.keys, name)
            latest = max(int(v) for v in entry["versions"])
            entry["versions"][str(latest + 1)] = _new_version(self._now())
            return _info(name, entry)

    def set_version_state(self, name: str, version: int, state: str) -> KeyInfo:
        if state not in ("active", "disabled"):
            raise KeyProviderError("a version can only be set active or disabled (use destroy to shred)")
        with self._update() as ks:
            entry = self._entry(ks.keys, name)
            data = entry["versions"].get(str(version))
            if data is None:
                raise KeyNotFound(f"local:{name} has no version {version}")
            if data["state"] in ("destroyed", "pending-destroy"):
                raise KeyDisabled(
                    f"version {version} of local:{name} is {data['state']}; cancel the destruction first"
                    if data["state"] == "pending-destroy"
                    else f"version {version} of local:{name} is destroyed and cannot be changed"
                )
            data["state"] = state
            return _info(name, entry)

    def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        with self._update() as ks:
            entry = self._entry(ks.keys, name)
            if not 1 <= version <= max(int(v) for v in entry["versions"]):
                raise KeyProviderError(f"local:{name} has no version {version}")
            entry["min_decryption_version"] = version
            return _info(name, entry)

    def destroy(self, name: str, version: int | None, after: float = 0.0) -> KeyInfo:
        """Crypto-shred: erase the KEK material from the keystore for good.

        With ``after`` > 0 the versions are only scheduled: they stop working at
        once (state ``pending-destroy``) and are erased by the first keystore
        update (any: ``keystore.locked_update`` saves through ``purge_overdue``)
        after ``after`` seconds; ``cancel_destroy`` undoes the schedule until then.
        With ``after`` = 0 they are erased now.
        """
        with self._update() as ks:
            entry = self._entry(ks.keys, name)
            targets = [str(version)] if version is not None else list(entry["versions"])
            for v in targets:
                data = entry["versions"].get(v)
                if data is None:
                    raise KeyNotFound(f"local:{name} has no version {v}")
                if data["state"] == "destroyed":
                    continue
                if after > 0:
                    # A second schedule never postpones the first: only cancel_destroy can.
                    deadline = min(float(data.get("destroy_after", math.inf)), self._now() + after)
                    data["state"], data["destroy_after"] = "pending-destroy", deadline
                else:
                    data["state"], data["material"] = "destroyed", None
                    data.pop("destroy_after", None)
            keystore.purge_overdue(ks.keys, self._now())  # so the report shows what the save erases
            return _info(name, entry)

    def cancel_destroy(self, name: str, version: int | None) -> KeyInfo:
        """Undo a scheduled destruction; the versions come back disabled (enable them explicitly).

        Refused once the waiting period is over, even if no update has erased the
        material yet: the refusal's save erases it. Nothing is cancelled then.
        """
        with self._update() as ks:
            entry = self._entry(ks.keys, name)
            targets = [str(version)] if version is not None else sorted(entry["versions"], key=int)
            erased = keystore.purge_overdue(ks.keys, self._now())  # the save below writes the erasure
            refused = [v for v in targets if f"{name}#{v}" in erased]
            for v in targets if not refused else []:
                data = entry["versions"].get(v)
                if data is None:
                    raise KeyNotFound(f"local:{name} has no version {v}")
                if data["state"] == "destroyed" and version is not None:
                    raise KeyDisabled(f"version {v} of local:{name} is destroyed and cannot be brought back")
                if data["state"] == "pending-destroy":
                    data["state"] = "disabled"
                    data.pop("destroy_after", None)
            info = _info(name, entry)
        if refused:
            raise KeyDisabled(
                f"the waiting period of version {', '.join(refused)} of local:{name} is over: "
                "its key material is erased and cannot be brought back"
            )
        return info

    def purge(self) -> list[str]:
        """Erase every version whose waiting period is over; returns ``name#version`` of each.

        Every keystore update does this too; ``purge`` is for when nothing else changes.
        """
        with self._update() as ks:
            return keystore.purge_overdue(ks.keys, self._now())

    def list(self) -> list[KeyInfo]:
        keys = keystore.unlock(self.path, self._passphrase).keys
        return [_info(n, keys[n]) for n in sorted(keys)]

    def info(self, name: str) -> KeyInfo:
        return _info(name, self._entry(keystore.unlock(self.path, self._passphrase).keys, name))


__all__ = ["LocalProvider"]
