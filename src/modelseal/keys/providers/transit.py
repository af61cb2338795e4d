"""``transit:`` provider: KEKs in OpenBao / Vault Transit, through ``hvac``.

Key URI: ``transit:NAME`` or ``transit:MOUNT/NAME`` (default mount ``transit``).
Connection: ``BAO_ADDR``/``VAULT_ADDR``; a token from ``BAO_TOKEN``/``VAULT_TOKEN``,
or AppRole (``BAO_ROLE_ID`` and ``BAO_SECRET_ID``, or ``BAO_SECRET_ID_FILE``),
logged in again when the token expires. TLS is verified (``BAO_CACERT``/
``VAULT_CACERT`` for a private CA); plain ``http`` is refused except to loopback.

Keys are *derived* aes256-gcm96 keys: every encrypt and decrypt passes the
canonical encryption context as the derivation context, so a wrap made for
``env=prod`` cannot be unwrapped under any other context, and the server-side
``rewrap`` (no plaintext leaves the server) still works. The key version is
read from the ciphertext (``vault:vN:``), and ``min_decryption_version`` is the
server's to enforce. Transient failures are retried with backoff, a bounded
number of times; the key material never leaves OpenBao.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError
from modelseal.format.header import Recipient, encode_context
from modelseal.keys.providers.base import KeyInfo, KeyVersionInfo

_VERSION = re.compile(r"^(?:vault|bao):v(\d+):")
BATCH = 100  # OpenBao refuses JSON with too many strings ("exceeded maximum number of strings"): about 1000, 4 per item
RETRIES = 4


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def derivation_context(context: tuple[tuple[str, str], ...]) -> str:
    return base64.b64encode(b"modelseal/transit/v1\x00" + encode_context(context)).decode()


_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def allowed_mounts() -> set[str]:
    """Transit mounts modelseal will talk to: ``transit`` plus ``MODELSEAL_TRANSIT_MOUNTS``.

    A recipient read from an artifact names its mount; without this list an
    artifact could steer the reader's token to any OpenBao path.
    """
    extra = os.environ.get("MODELSEAL_TRANSIT_MOUNTS", "")
    return {"transit", *(m.strip().strip("/") for m in extra.split(",") if m.strip())}


def split_name(name: str) -> tuple[str, str]:
    mount, _, key = name.rpartition("/")
    mount = mount or "transit"
    segments = [*mount.split("/"), key]
    if not all(_SEGMENT.fullmatch(x) and x not in (".", "..") for x in segments):
        raise KeyProviderError(f"invalid transit key name {name!r}: use NAME or MOUNT/NAME of [A-Za-z0-9_.-]")
    if mount not in allowed_mounts():
        raise KeyProviderError(f"transit mount {mount!r} is not allowed; list it in MODELSEAL_TRANSIT_MOUNTS")
    return mount, key


def canonical_name(name: str) -> str:
    mount, key = split_name(name)
    return f"{mount}/{key}"


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class TransitProvider:
    scheme = "transit"

    def __init__(
        self, client_factory: Callable[[], Any] | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._factory = client_factory or self._client_from_env
        self._client: Any = None
        self._sleep = sleep
        self._checked: dict[str, float] = {}

    # -- connection ----------------------------------------------------
    def _client_from_env(self) -> Any:
        import hvac

        addr = _env("BAO_ADDR", "VAULT_ADDR")
        if not addr:
            raise KeyProviderError("transit: set BAO_ADDR (or VAULT_ADDR) to the OpenBao/Vault address")
        url = urlparse(addr)
        if url.scheme == "http" and not _is_loopback(url.hostname):
            raise KeyProviderError("transit: plain http is allowed only to a loopback address; use https")
        verify: bool | str = _env("BAO_CACERT", "VAULT_CACERT") or True
        client = hvac.Client(url=addr, verify=verify, timeout=10)
        # No HTTP(S)_PROXY from the environment: a proxy would see the token (and, over
        # loopback http, wrapped keys) and defeat the loopback-only rule.
        client.session.trust_env = False
        token = _env("BAO_TOKEN", "VAULT_TOKEN")
        if token:
            client.token = token
        else:
            self._approle_login(client)
        return client

    @staticmethod
    def _approle_login(client: Any) -> None:
        role = _env("BAO_ROLE_ID", "VAULT_ROLE_ID")
        secret = _env("BAO_SECRET_ID", "VAULT_SECRET_ID")
        secret_file = _env("BAO_SECRET_ID_FILE")
        if secret is None and secret_file:
            with open(secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        if not role or not secret:
            raise KeyProviderError("transit: no credentials: set BAO_TOKEN, or BAO_ROLE_ID and BAO_SECRET_ID")
        client.auth.approle.login(role_id=role, secret_id=secret)

    def _call(self, what: str, fn: Callable[[Any], Any], idempotent: bool = True) -> Any:
        """Run one request: retry transient failures with backoff, re-login once on an
        expired AppRole token, and map server answers onto the modelseal errors."""
        import hvac.exceptions as hx
        import requests

        delay = 0.2
        relogged = False
        for attempt in range(RETRIES):
            try:
                if self._client is None:
                    self._client = self._factory()
                return fn(self._client)
            except (
                requests.ConnectionError,
                requests.Timeout,
                hx.VaultDown,
                hx.InternalServerError,
                hx.BadGateway,
                hx.RateLimitExceeded,
            ):
                # A request that changes state (rotate, create) may have happened: never repeat it.
                if attempt == RETRIES - 1 or not idempotent:
                    raise KeyProviderError(f"transit: the server is unreachable during {what}") from None
                self._sleep(delay)
                delay *= 2
            except hx.Forbidden:
                if relogged or _env("BAO_TOKEN", "VAULT_TOKEN"):
                    raise KeyProviderError(f"transit: permission denied for {what}") from None
                relogged = True
                self._client = None  # AppRole token expired: log in again
            except hx.InvalidPath:
                raise KeyNotFound(f"transit: no such key or mount for {what}") from None
            except hx.InvalidRequest as e:
                raise self._classify(str(e), what) from None
        raise KeyProviderError(f"transit: {what} failed")

    @staticmethod
    def _classify(message: str, what: str) -> Exception:
        m = message.lower()
        if "not found" in m:
            return KeyNotFound(f"transit: no such key for {what}")
        if "disallowed by policy" in m or "too old" in m or "min_decryption_version" in m:
            return KeyDisabled(f"transit: the key version is below the minimum decryption version ({what})")
        if "authentication failed" in m or "invalid ciphertext" in m or "decrypt" in m:
            return DecryptionError()
        if "derivation" in m or "context" in m:
            return KeyProviderError(
                f"transit: the key must be a derived key (create it with modelseal key create) ({what})"
            )
        return KeyProviderError(f"transit: the server refused {what}")

    # -- wrap / unwrap -------------------------------------------------
    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        mount, key = split_name(name)
        self._check_key(name, fresh=True)
        resp = self._call(
            f"wrap with transit:{name}",
            lambda c: c.secrets.transit.encrypt_data(
                key, plaintext=base64.b64encode(dek).decode(), context=derivation_context(context), mount_point=mount
            ),
        )
        ct = resp["data"]["ciphertext"]
        return Recipient("transit", name, self._version(ct), ct.encode())

    def generate(self, name: str, context: tuple[tuple[str, str], ...]) -> tuple[bytes, Recipient]:
        """A data key made by Transit (``datakey``), bound to the context like a wrap."""
        mount, key = split_name(name)
        self._check_key(name, fresh=True)
        resp = self._call(
            f"generate a data key with transit:{name}",
            lambda c: c.secrets.transit.generate_data_key(
                key, key_type="plaintext", context=derivation_context(context), bits=256, mount_point=mount
            ),
        )
        dek = base64.b64decode(resp["data"]["plaintext"])
        if len(dek) != 32:
            raise KeyProviderError("transit: datakey returned a key of the wrong size")
        ct = resp["data"]["ciphertext"]
        return dek, Recipient("transit", name, self._version(ct), ct.encode())

    def _check_key(self, name: str, fresh: bool = False) -> None:
        """The key must exist and be a derived, non-exportable aes256-gcm96 key.

        Checked right before every wrap: Transit's encrypt would otherwise *create*
        a missing key (upsert), and a non-derived key would ignore the context.
        For unwraps the answer is cached for a minute (derivation cannot be
        turned off once on). The token's policy should also deny ``create`` on
        ``<mount>/encrypt/*`` so the server itself refuses to make keys.
        """
        now = time.monotonic()
        if not fresh and self._checked.get(name, 0.0) > now:
            return
        mount, key = split_name(name)
        data = self._call(f"read transit:{name}", lambda c: c.secrets.transit.read_key(key, mount_point=mount))["data"]
        if not data.get("derived") or data.get("type") != "aes256-gcm96" or data.get("exportable"):
            raise KeyProviderError(
                f"transit:{name} must be a derived, non-exportable aes256-gcm96 key"
                " (create it with modelseal key create)"
            )
        self._checked[name] = now + 60.0

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
        if any(
            r.key_id != name or self._version(r.wrapped.decode("ascii", "replace")) != r.key_version for r in recipients
        ):
            raise DecryptionError()  # the recorded version must be the one inside the ciphertext
        self._check_key(name)
        dctxs = [derivation_context(c) for c in (contexts or [context] * len(recipients))]
        if len(dctxs) != len(recipients):
            raise KeyProviderError("one context per recipient is needed")
        for i in range(0, len(recipients), BATCH):
            part = recipients[i : i + BATCH]
            batch = [
                {"ciphertext": r.wrapped.decode("ascii", "replace"), "context": d}
                for r, d in zip(part, dctxs[i : i + BATCH], strict=True)
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
        return out

    def rewrap_many(
        self,
        recipients: Sequence[Recipient],
        context: tuple[tuple[str, str], ...],
        contexts: Sequence[tuple[tuple[str, str], ...]] | None = None,
    ) -> list[Recipient]:
        """Server-side rewrap to the newest key version: no plaintext key leaves OpenBao."""
        out: list[Recipient] = []
        if not recipients:
            return out
        name = recipients[0].key_id
        mount, key = split_name(name)
        if any(r.key_id != name for r in recipients):
            raise KeyProviderError("rewrap_many takes recipients of one key")
        self._check_key(name, fresh=True)  # rewrap, like encrypt, must not create a key
        dctxs = [derivation_context(c) for c in (contexts or [context] * len(recipients))]
        if len(dctxs) != len(recipients):
            raise KeyProviderError("one context per recipient is needed")
        for i in range(0, len(recipients), BATCH):
            batch = [
                {"ciphertext": r.wrapped.decode("ascii", "replace"), "context": d}
                for r, d in zip(recipients[i : i + BATCH], dctxs[i : i + BATCH], strict=True)
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
                ct = item["ciphertext"]
                out.append(Recipient("transit", name, self._version(ct), ct.encode()))
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
        """Transit has no per-version switch: disabling version v raises the key's
        ``min_decryption_version`` to v+1 (so every version up to v stops decrypting);
        enabling lowers it back to v."""
        mount, key = split_name(name)
        minimum = version + 1 if state == "disabled" else version
        if minimum > self.info(name).latest:
            raise KeyProviderError(f"transit cannot disable the newest version of {name}; rotate the key first")
        self._call(
            f"configure transit:{name}",
            lambda c: c.secrets.transit.update_key_configuration(
                key, min_decryption_version=minimum, mount_point=mount
            ),
        )
        return self.info(name)

    def destroy(self, name: str, version: int | None) -> KeyInfo:
        """Destroy versions for good: up to ``version`` via trim, or the whole key."""
        mount, key = split_name(name)
        info = self.info(name)
        if version is not None:

            def trim(c: Any) -> Any:
                c.secrets.transit.update_key_configuration(
                    key, min_decryption_version=version + 1, min_encryption_version=version + 1, mount_point=mount
                )
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
        minimum = int(data.get("min_decryption_version", 1))
        versions = []
        for v, created in sorted(data.get("keys", {}).items(), key=lambda kv: int(kv[0])):
            ts = float(created) if isinstance(created, int | float) else 0.0
            state = "active" if int(v) >= minimum else "disabled"
            versions.append(KeyVersionInfo(int(v), ts, state))
        return KeyInfo(f"transit:{name}", tuple(versions), minimum)

    def list(self) -> list[KeyInfo]:
        resp = self._call("list transit keys", lambda c: c.secrets.transit.list_keys())
        return [self.info(k) for k in resp["data"]["keys"]]
