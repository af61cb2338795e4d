"""``transit:`` provider: KEKs in OpenBao / Vault Transit, through ``hvac``.

Key URI: ``transit:NAME`` or ``transit:MOUNT/NAME`` (default mount ``transit``).
Connection: ``BAO_ADDR``/``VAULT_ADDR``; a token from ``BAO_TOKEN``/``VAULT_TOKEN``,
or AppRole (``BAO_ROLE_ID`` and ``BAO_SECRET_ID``, or ``BAO_SECRET_ID_FILE``),
logged in again when the token expires. TLS is verified (``BAO_CACERT``/
``VAULT_CACERT`` for a private CA); plain ``http`` is refused except to loopback.

Keys are non-exportable ``aes256-gcm96`` or ``chacha20-poly1305`` keys, and every
encrypt and decrypt binds the canonical encryption context, so a wrap made for
``env=prod`` cannot be unwrapped under any other context. How it is bound follows
from the key as the server describes it (``binding``): a *derived* key takes it as
the derivation context (the server-side ``rewrap`` works, no plaintext leaves the
server); a plain key takes it as ``associated_data`` (Vault 1.13+, OpenBao), and the
stored wrap says so with an ``ad:`` tag. The tag is checked, never obeyed: a wrap
whose tag disagrees with the key fails closed, and a context is never left unbound.
The key version is read from the ciphertext (``vault:vN:``), and
``min_decryption_version`` is the server's to enforce. Transient failures are
retried with backoff, a bounded number of times; the key material never leaves
OpenBao (the connection, settings, key rules and retries are ``transit_client``'s).

Lifecycle maps onto what Transit can express and nothing more: it has one switch,
``min_decryption_version``, and trims versions from the oldest up, so an enable,
disable or destroy that would move any version but the one named is refused.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from modelseal.errors import DecryptionError, KeyNotFound, KeyProviderError
from modelseal.format.header import Recipient
from modelseal.keys.providers.base import KeyInfo, KeyVersionInfo
from modelseal.keys.providers.transit_client import (
    AD,
    AD_TAG,
    DERIVED,
    RETRIES,
    TransitClient,
    allowed_mounts,
    associated_data,
    binding,
    bound_fields,
    canonical_name,
    derivation_context,
    split_name,
)

__all__ = [
    "AD",
    "BATCH",
    "DERIVED",
    "RETRIES",
    "TransitProvider",
    "allowed_mounts",
    "associated_data",
    "binding",
    "canonical_name",
    "derivation_context",
    "split_name",
]

_VERSION = re.compile(r"^(?:vault|bao):v(\d+):")
BATCH = 100  # OpenBao refuses JSON with too many strings ("exceeded maximum number of strings"): about 1000, 4 per item


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo} to {hi}"


class TransitProvider(TransitClient):
    scheme = "transit"

    def __init__(
        self, client_factory: Callable[[], Any] | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        super().__init__(client_factory, sleep)
        self._checked: dict[str, tuple[float, str]] = {}

    # -- wrap / unwrap -------------------------------------------------
    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        return self._encrypt(name, self._check_key(name, fresh=True), [dek], [context], "wrap")[0]

    def _encrypt(
        self,
        name: str,
        how: str,
        deks: Sequence[bytes],
        contexts: Sequence[tuple[tuple[str, str], ...]],
        what: str,
    ) -> list[Recipient]:
        """Batch ``encrypt`` of data keys, each bound to its context; ``how`` is the checked key's."""
        mount, key = split_name(name)
        out: list[Recipient] = []
        for i in range(0, len(deks), BATCH):
            batch = [
                {"plaintext": base64.b64encode(d).decode(), **bound_fields(how, c)}
                for d, c in zip(deks[i : i + BATCH], contexts[i : i + BATCH], strict=True)
            ]
            resp = self._call(
                f"{what} with transit:{name}",
                lambda c, b=batch: c.secrets.transit.encrypt_data(key, batch_input=b, mount_point=mount),  # type: ignore[misc]
            )
            for item in resp["data"]["batch_results"]:
                if item.get("error"):
                    raise self._classify(item["error"], f"{what} with transit:{name}")
                out.append(self._recipient(name, how, item["ciphertext"]))
        if len(out) != len(deks):
            raise KeyProviderError(f"transit: {what} with transit:{name} returned the wrong number of results")
        return out

    def _recipient(self, name: str, how: str, ciphertext: str) -> Recipient:
        tagged = AD_TAG + ciphertext if how == AD else ciphertext
        return Recipient("transit", name, self._version(ciphertext), tagged.encode())

    def _ciphertext(self, r: Recipient, name: str, how: str) -> str:
        """The Transit ciphertext of a stored wrap, checked against the key's binding.

        The ``ad:`` tag comes from the artifact and is only a claim: the binding is the
        key's (``how``). A wrap that claims the other binding, names another key, or
        records another version than its ciphertext holds fails closed."""
        text = r.wrapped.decode("ascii", "replace")
        claimed, ct = (AD, text[len(AD_TAG) :]) if text.startswith(AD_TAG) else (DERIVED, text)
        if r.key_id != name or claimed != how or self._version(ct) != r.key_version:
            raise DecryptionError()
        return ct

    def generate(self, name: str, context: tuple[tuple[str, str], ...]) -> tuple[bytes, Recipient]:
        """A data key bound to the context like a wrap: made by Transit (``datakey``) under
        a derived key; under a plain key from the OS CSPRNG and wrapped by ``encrypt``, whose
        ``associated_data`` Vault documents (its ``datakey`` is not documented to bind it)."""
        how = self._check_key(name, fresh=True)
        if how == AD:
            dek = os.urandom(32)
            return dek, self._encrypt(name, how, [dek], [context], "generate a data key")[0]
        mount, key = split_name(name)
        resp = self._call(
            f"generate a data key with transit:{name}",
            lambda c: c.secrets.transit.generate_data_key(
                key, key_type="plaintext", context=derivation_context(context), bits=256, mount_point=mount
            ),
        )
        dek = base64.b64decode(resp["data"]["plaintext"])
        if len(dek) != 32:
            raise KeyProviderError("transit: datakey returned a key of the wrong size")
        return dek, self._recipient(name, how, resp["data"]["ciphertext"])

    def _check_key(self, name: str, fresh: bool = False) -> str:
        """The key must exist and be one ``binding`` accepts; returns its binding.

        Checked right before every wrap: Transit's encrypt would otherwise *create*
        a missing key (upsert). For unwraps the answer is cached for a minute (a
        key's type and derivation are fixed at creation). The token's policy should
        also deny ``create`` on ``<mount>/encrypt/*`` so the server itself refuses to
        make keys.
        """
        now = time.monotonic()
        cached = self._checked.get(name)
        if not fresh and cached is not None and cached[0] > now:
            return cached[1]
        mount, key = split_name(name)
        data = self._call(f"read transit:{name}", lambda c: c.secrets.transit.read_key(key, mount_point=mount))["data"]
        how = binding(name, data)
        if fresh and how == AD:
            self._prove_ad_bound(name)  # before a wrap: never a silently unbound one
        self._checked[name] = (now + 60.0, how)
        return how

    def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
        return self.unwrap_many([recipient], context)[0]

    def unwrap_many(
        self,
        recipients: Sequence[Recipient],
        context: tuple[tuple[str, str], ...],
        contexts: Sequence[tuple[tuple[str, str], ...]] | None = None,
    ) -> list[bytes]:
        """Unwrap several wrapped keys of one transit key, in batches below the server's limit.

        ``contexts`` gives each item its own context (artifacts of a rotation differ)."""
        out: list[bytes] = []
        if not recipients:
            return out
        name = recipients[0].key_id
        mount, key = split_name(name)
        if any(r.key_id != name for r in recipients):
            raise DecryptionError()
        ctxs = list(contexts or [context] * len(recipients))
        if len(ctxs) != len(recipients):
            raise KeyProviderError("one context per recipient is needed")
        how = self._check_key(name)
        cts = [self._ciphertext(r, name, how) for r in recipients]
        for i in range(0, len(recipients), BATCH):
            batch = [
                {"ciphertext": ct, **bound_fields(how, c)}
                for ct, c in zip(cts[i : i + BATCH], ctxs[i : i + BATCH], strict=True)
            ]
            resp = self._call(
                f"unwrap with transit:{recipients[0].key_id}",
                lambda c, b=batch: c.secrets.transit.decrypt_data(key, batch_input=b, mount_point=mount),  # type: ignore[misc]
            )
            for item in resp["data"]["batch_results"]:
                if item.get("error"):
                    raise self._classify(item["error"], f"unwrap with transit:{recipients[0].key_id}")
                dek = base64.b64decode(item["plaintext"])
                if len(dek) != 32:
                    raise DecryptionError()
                out.append(dek)
        if len(out) != len(recipients):  # a short answer must not shift data keys between artifacts
            raise KeyProviderError("transit: unwrap returned the wrong number of results")
        return out

    def rewrap_many(
        self,
        recipients: Sequence[Recipient],
        context: tuple[tuple[str, str], ...],
        contexts: Sequence[tuple[tuple[str, str], ...]] | None = None,
    ) -> list[Recipient]:
        """Rewrap to the newest key version, keeping each wrap's binding.

        Derived keys: server-side ``rewrap``, no plaintext key leaves OpenBao. Plain keys:
        Transit's ``rewrap`` takes no ``associated_data`` (it fails authentication), so the
        data keys are decrypted and encrypted again, bound to the same contexts."""
        out: list[Recipient] = []
        if not recipients:
            return out
        name = recipients[0].key_id
        mount, key = split_name(name)
        if any(r.key_id != name for r in recipients):
            raise KeyProviderError("rewrap_many takes recipients of one key")
        ctxs = list(contexts or [context] * len(recipients))
        if len(ctxs) != len(recipients):
            raise KeyProviderError("one context per recipient is needed")
        how = self._check_key(name, fresh=True)  # rewrap, like encrypt, must not create a key
        if how == AD:
            return self._encrypt(name, how, self.unwrap_many(recipients, context, ctxs), ctxs, "rewrap")
        cts = [self._ciphertext(r, name, how) for r in recipients]
        for i in range(0, len(recipients), BATCH):
            batch = [
                {"ciphertext": ct, **bound_fields(how, c)}
                for ct, c in zip(cts[i : i + BATCH], ctxs[i : i + BATCH], strict=True)
            ]
            resp = self._call(
                f"rewrap with transit:{name}",
                lambda c, b=batch: c.secrets.transit.rewrap_data(  # type: ignore[misc]
                    key, ciphertext="", batch_input=b, mount_point=mount
                ),
            )
            for item in resp["data"]["batch_results"]:
                if item.get("error"):
                    raise self._classify(item["error"], f"rewrap with transit:{name}")
                out.append(self._recipient(name, how, item["ciphertext"]))
        if len(out) != len(recipients):
            raise KeyProviderError(f"transit: rewrap with transit:{name} returned the wrong number of results")
        return out

    @staticmethod
    def _version(ciphertext: str) -> int:
        m = _VERSION.match(ciphertext)
        if not m:
            raise DecryptionError()  # not a Transit ciphertext
        return int(m.group(1))

    # -- lifecycle -----------------------------------------------------
    def create(self, name: str) -> KeyInfo:
        mount, key = split_name(name)
        self._call(
            f"create transit:{name}",
            lambda c: c.secrets.transit.create_key(
                key, derived=True, exportable=False, key_type="aes256-gcm96", mount_point=mount
            ),
        )
        return self.info(name)

    def rotate(self, name: str) -> KeyInfo:
        mount, key = split_name(name)
        self._call(
            f"rotate transit:{name}", lambda c: c.secrets.transit.rotate_key(key, mount_point=mount), idempotent=False
        )
        return self.info(name)

    def set_version_state(self, name: str, version: int, state: str) -> KeyInfo:
        """Disable or enable exactly one version, or refuse.

        Transit has no per-version switch, only ``min_decryption_version`` M: versions
        below M are disabled, the others active. So disabling version v is possible only
        when v is the oldest active one (M becomes v+1), and enabling it only when it is
        the newest disabled one (M becomes v); anything else would silently change other
        versions too and is refused (``set_min_decryption_version`` moves M on purpose).
        A version already in the asked state is left alone.
        """
        info = self.info(name)
        present = {v.version for v in info.versions}
        if version not in present:
            raise KeyNotFound(f"transit:{name} has no version {version} (destroyed?)")
        current = info.min_decryption_version
        if state == "disabled":
            if version < current:
                return info  # already disabled
            if version == info.latest:
                raise KeyProviderError(f"transit cannot disable the newest version of {name}; rotate the key first")
            if version > current:
                raise KeyProviderError(
                    f"transit cannot disable version {version} of {name} alone: Transit disables versions from the"
                    f" oldest up, and versions {_span(current, version - 1)} are active; disable them first, or"
                    f" disable all of them with: modelseal key min-version transit:{name} {version + 1}"
                )
            return self._set_minimum(name, version + 1)
        if version >= current:
            return info  # already active
        if version < current - 1:
            raise KeyProviderError(
                f"transit cannot enable version {version} of {name} alone: Transit enables versions from the newest"
                f" down, and versions {_span(version + 1, current - 1)} are disabled; enable them first, or enable"
                f" all of them with: modelseal key min-version transit:{name} {version}"
            )
        return self._set_minimum(name, version)

    def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        """Versions below ``version`` stop decrypting, the others decrypt (what Transit expresses)."""
        info = self.info(name)
        present = sorted(v.version for v in info.versions)
        if not present or not present[0] <= version <= info.latest:
            raise KeyProviderError(
                f"transit:{name} has versions {_span(present[0], info.latest) if present else '(none)'}; "
                f"the minimum decryption version must be one of them"
            )
        return self._set_minimum(name, version)

    def _set_minimum(self, name: str, minimum: int) -> KeyInfo:
        mount, key = split_name(name)
        self._call(
            f"configure transit:{name}",
            lambda c: c.secrets.transit.update_key_configuration(
                key, min_decryption_version=minimum, mount_point=mount
            ),
        )
        return self.info(name)

    def destroy(self, name: str, version: int | None) -> KeyInfo:
        """Destroy versions for good: the oldest remaining one (trim), or the whole key.

        Transit trims every version below a bound, so destroying version v alone is
        possible only when no older version remains; otherwise it is refused. Trimming
        never lowers the minimum decryption or encryption version (that would bring
        disabled versions back).
        """
        mount, key = split_name(name)
        info = self.info(name)
        if version is not None:
            present = sorted(v.version for v in info.versions)
            if version not in present:
                raise KeyNotFound(f"transit:{name} has no version {version} (already destroyed?)")
            if version == info.latest:
                raise KeyProviderError(f"transit cannot destroy the newest version of {name}; rotate the key first")
            older = [v for v in present if v < version]
            if older:
                raise KeyProviderError(
                    f"transit cannot destroy version {version} of {name} alone: Transit destroys versions from the"
                    f" oldest up, and versions {_span(older[0], older[-1])} are older; destroy them first"
                )
            data = self._call(f"read transit:{name}", lambda c: c.secrets.transit.read_key(key, mount_point=mount))[
                "data"
            ]
            min_dec = max(int(data.get("min_decryption_version", 1) or 1), version + 1)
            min_enc = max(int(data.get("min_encryption_version", 0) or 0), min_dec)  # Transit: enc >= dec

            def trim(c: Any) -> Any:
                # Two requests: hvac wants min_encryption > min_decryption when both are sent,
                # OpenBao accepts them equal; trim needs both at or above the bound.
                c.secrets.transit.update_key_configuration(key, min_decryption_version=min_dec, mount_point=mount)
                c.secrets.transit.update_key_configuration(key, min_encryption_version=min_enc, mount_point=mount)
                return c.secrets.transit.trim_key(key, min_version=version + 1, mount_point=mount)

            self._call(f"destroy versions of transit:{name}", trim)
            return self.info(name)

        def delete(c: Any) -> Any:
            c.secrets.transit.update_key_configuration(key, deletion_allowed=True, mount_point=mount)
            return c.secrets.transit.delete_key(key, mount_point=mount)

        self._call(f"destroy transit:{name}", delete)
        return KeyInfo(info.uri, tuple(KeyVersionInfo(v.version, v.created, "destroyed") for v in info.versions), 0)

    def info(self, name: str) -> KeyInfo:
        mount, key = split_name(name)
        data = self._call(f"read transit:{name}", lambda c: c.secrets.transit.read_key(key, mount_point=mount))["data"]
        minimum = max(1, int(data.get("min_decryption_version", 1) or 1))
        created = {int(v): t for v, t in data.get("keys", {}).items()}
        # ``keys`` lists only the versions that decrypt; the disabled ones below the minimum
        # still exist down to ``min_available_version`` (versions below it were trimmed).
        latest = int(data.get("latest_version") or max(created, default=1))
        lowest = max(1, int(data.get("min_available_version", 0) or 0))
        versions = [
            KeyVersionInfo(
                v,
                float(t) if isinstance(t := created.get(v), int | float) else 0.0,
                "active" if v >= minimum else "disabled",
            )
            for v in range(lowest, latest + 1)
        ]
        return KeyInfo(f"transit:{name}", tuple(versions), minimum)

    def list(self) -> list[KeyInfo]:
        resp = self._call("list transit keys", lambda c: c.secrets.transit.list_keys())
        return [self.info(k) for k in resp["data"]["keys"]]
