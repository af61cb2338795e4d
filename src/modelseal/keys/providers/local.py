"""``local:`` provider: KEKs held in the embedded keystore (``modelseal.keys.keystore``).

Wrapping is AES-256-GCM under the newest active KEK version with a random
96-bit nonce; the associated data binds the key name, the version and the
canonical encryption context, so a wrap made for one context or key cannot
be unwrapped under another.

With ``MODELSEAL_AGENT_SOCK`` set, ``wrap``, ``unwrap``, ``list`` and ``info`` are done by
the agent (``keys.agent``, through ``keys.agent_client``), which holds the unlocked
keystore: no passphrase and no KDF in this process. Lifecycle operations rewrite the
keystore and still unlock it here with the passphrase; the agent notices the new file.
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
from modelseal.keys import agent_client, keystore
from modelseal.keys.providers.base import KeyInfo, KeyVersionInfo

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _aad(name: str, version: int, context: tuple[tuple[str, str], ...]) -> bytes:
    return (
        b"modelseal/local-wrap/v1\x00" + name.encode() + b"\x00" + struct.pack(">I", version) + encode_context(context)
    )


def key_info(name: str, entry: dict[str, Any]) -> KeyInfo:
    """The public description of one key table entry (no key material)."""
    versions = tuple(
        KeyVersionInfo(int(v), float(d["created"]), str(d["state"]))
        for v, d in sorted(entry["versions"].items(), key=lambda kv: int(kv[0]))
    )
    return KeyInfo(f"local:{name}", versions, int(entry.get("min_decryption_version", 1)))


def _new_version(now: float) -> dict[str, Any]:
    return {"created": now, "state": "active", "material": base64.b64encode(os.urandom(32)).decode()}


def entry_of(keys: dict[str, Any], name: str) -> dict[str, Any]:
    entry = keys.get(name)
    if not isinstance(entry, dict):
        raise KeyNotFound(f"no key local:{name} in the keystore")
    return entry


# The KEK of one version: (version, its table entry) -> 32 key bytes (any buffer).
Material = Callable[[int, dict[str, Any]], Any]


def _material(version: int, data: dict[str, Any]) -> bytes:
    return base64.b64decode(data["material"])


def wrap_entry(
    name: str, entry: dict[str, Any], dek: bytes, context: tuple[tuple[str, str], ...], material: Material
) -> Recipient:
    """Wrap ``dek`` under the newest version of ``entry``, which must be active. Shared by
    the provider and ``keys.agent``, which holds the KEKs in memory of its own."""
    version = max(int(v) for v in entry["versions"])
    data = entry["versions"][str(version)]
    if data["state"] != "active":
        raise KeyDisabled(f"newest version {version} of local:{name} is {data['state']}; rotate the key first")
    nonce = os.urandom(12)
    ct = AESGCM(material(version, data)).encrypt(nonce, dek, _aad(name, version, context))
    return Recipient("local", name, version, nonce + ct)


def unwrap_entry(
    entry: dict[str, Any], recipient: Recipient, context: tuple[tuple[str, str], ...], material: Material
) -> bytes:
    """Unwrap ``recipient`` with its version of ``entry``: refused unless that version is
    active and at least the minimum decryption version."""
    name, version = recipient.key_id, recipient.key_version
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
        return AESGCM(material(version, data)).decrypt(w[:12], w[12:], _aad(name, version, context))
    except InvalidTag:
        raise DecryptionError() from None


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
        return entry_of(keys, name)

    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        agent = agent_client.from_env()
        if agent is not None:  # the agent holds the KEKs: no passphrase, no KDF here
            return agent.wrap(self.path, name, dek, context)
        entry = entry_of(keystore.unlock(self.path, self._passphrase).keys, name)
        return wrap_entry(name, entry, dek, context, _material)

    def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
        agent = agent_client.from_env()
        if agent is not None:
            return agent.unwrap(self.path, recipient, context)
        entry = entry_of(keystore.unlock(self.path, self._passphrase).keys, recipient.key_id)
        return unwrap_entry(entry, recipient, context, _material)

    # -- lifecycle -----------------------------------------------------
    def create(self, name: str) -> KeyInfo:
        if not _NAME.fullmatch(name):
            raise KeyProviderError(f"invalid key name {name!r}: use 1-128 of [A-Za-z0-9._-]")
        with self._update() as ks:
            if name in ks.keys:
                raise KeyProviderError(f"key local:{name} already exists")
            now = self._now()
            ks.keys[name] = {"created": now, "min_decryption_version": 1, "versions": {"1": _new_version(now)}}
            return key_info(name, ks.keys[name])

    def rotate(self, name: str) -> KeyInfo:
        with self._update() as ks:
            entry = self._entry(ks.keys, name)
            latest = max(int(v) for v in entry["versions"])
            entry["versions"][str(latest + 1)] = _new_version(self._now())
            return key_info(name, entry)

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
            return key_info(name, entry)

    def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        with self._update() as ks:
            entry = self._entry(ks.keys, name)
            if not 1 <= version <= max(int(v) for v in entry["versions"]):
                raise KeyProviderError(f"local:{name} has no version {version}")
            entry["min_decryption_version"] = version
            return key_info(name, entry)

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
            return key_info(name, entry)

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
            info = key_info(name, entry)
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
        agent = agent_client.from_env()
        if agent is not None:
            return agent.list(self.path)
        keys = keystore.unlock(self.path, self._passphrase).keys
        return [key_info(n, keys[n]) for n in sorted(keys)]

    def info(self, name: str) -> KeyInfo:
        agent = agent_client.from_env()
        if agent is not None:
            return agent.info(self.path, name)
        return key_info(name, self._entry(keystore.unlock(self.path, self._passphrase).keys, name))


__all__ = ["LocalProvider", "entry_of", "key_info", "unwrap_entry", "wrap_entry"]
