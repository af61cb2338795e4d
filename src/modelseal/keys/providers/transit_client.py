"""The connection half of the ``transit:`` provider: OpenBao / Vault through ``hvac``.

Owns the operator-side settings (address, TLS, credentials, the mount allow-list), the
key-name rules, the key rules (which Transit keys are accepted, and how a wrap under each
binds the encryption context), and one request with bounded retries and error mapping. Nothing read
from an artifact becomes a setting here: an artifact's key name is checked against the
segment rules and the operator's allowed mounts before any request names it.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError, ProviderUnavailable
from modelseal.format.header import encode_context
from modelseal.util.net import is_loopback

RETRIES = 4


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


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


DERIVED = "derived"  # a derived key: the context is the key-derivation context; the wrap is bare
AD = "ad"  # a plain AEAD key: the context is the associated data; the wrap is tagged ``ad:``
AD_TAG = "ad:"
_AEAD_TYPES = ("aes256-gcm96", "chacha20-poly1305")


def derivation_context(context: tuple[tuple[str, str], ...]) -> str:
    return base64.b64encode(b"modelseal/transit/v1\x00" + encode_context(context)).decode()


def associated_data(context: tuple[tuple[str, str], ...]) -> str:
    """Never empty: even the empty context binds the label, so an unbound wrap never opens."""
    return base64.b64encode(b"modelseal/transit-ad/v1\x00" + encode_context(context)).decode()


def binding(name: str, key: Mapping[str, Any]) -> str:
    """How a wrap under this key binds the context, from the server's ``read key`` answer.

    Refused: exportable keys (the KEK could leave the server) and every type that
    cannot bind associated data (rsa, ecdsa, ed25519, hmac, managed keys), or binds it
    under a key weaker than the 256-bit data key (aes128-gcm96, offered by Vault).
    """
    ktype = key.get("type")
    if key.get("exportable"):
        raise KeyProviderError(
            f"transit:{name} is exportable, so its key material can leave the server; use a non-exportable key"
            " (create one with modelseal key create)"
        )
    if ktype not in _AEAD_TYPES:
        raise KeyProviderError(
            f"transit:{name} is a {ktype!r} key, which cannot bind the encryption context;"
            " use a non-exportable aes256-gcm96 or chacha20-poly1305 key (create one with modelseal key create)"
        )
    return DERIVED if key.get("derived") else AD


def bound_fields(how: str, context: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The request fields that bind ``context`` under a key of binding ``how``."""
    if how == DERIVED:
        return {"context": derivation_context(context)}
    return {"associated_data": associated_data(context)}


def _server_messages(e: Exception) -> str:
    """The server's error messages only. ``str(e)`` also holds the request URL, whose path
    names the operation and the key (".../decrypt/NAME"), and for a batch the whole
    response, data keys of the items that succeeded included: neither may classify."""
    errors = getattr(e, "errors", None)
    if errors:
        return "; ".join(str(x) for x in errors)
    doc = getattr(e, "json", None)
    data = doc.get("data") if isinstance(doc, dict) else None
    items = data.get("batch_results") if isinstance(data, dict) else None
    if isinstance(items, list):
        return "; ".join(str(i["error"]) for i in items if isinstance(i, dict) and i.get("error"))
    return ""


class TransitClient:
    """An hvac client from the operator's environment, and ``_call`` around every request."""

    def __init__(
        self, client_factory: Callable[[], Any] | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._factory = client_factory or self._client_from_env
        self._client: Any = None
        self._sleep = sleep
        self._ad_proven: set[str] = set()

    def _prove_ad_bound(self, name: str) -> None:
        """Before the first wrap under a plain key: the server must really bind associated data.

        A server that does not know ``associated_data`` (Vault before 1.13) ignores it, and
        every wrap would silently bind no context. So encrypt a random probe under one
        associated data and require that decrypting it under another fails authentication.
        """
        if name in self._ad_proven:
            return
        mount, key = split_name(name)
        probe = base64.b64encode(os.urandom(32)).decode()
        ad = [base64.b64encode(b"modelseal/transit-ad/probe\x00" + x).decode() for x in (b"a", b"b")]
        ct = self._call(
            f"check transit:{name}",
            lambda c: c.secrets.transit.encrypt_data(key, plaintext=probe, associated_data=ad[0], mount_point=mount),
        )["data"]["ciphertext"]
        try:
            self._call(
                f"check transit:{name}",
                lambda c: c.secrets.transit.decrypt_data(key, ciphertext=ct, associated_data=ad[1], mount_point=mount),
            )
        except DecryptionError:
            self._ad_proven.add(name)
            return
        except ProviderUnavailable as e:
            if "permission denied" not in str(e):
                raise
            raise ProviderUnavailable(
                f"transit:{name}: permission denied for the decrypt that proves the server binds associated_data"
                " (one random probe before the first wrap under a plain key); grant transit decrypt on this key"
                " to the sealing token, or use a derived key"
            ) from None
        raise KeyProviderError(
            f"transit:{name}: the server ignores associated_data (Vault before 1.13?), so a plain key would bind"
            " no context; use a derived key (modelseal key create)"
        )

    def _client_from_env(self) -> Any:
        import hvac

        addr = _env("BAO_ADDR", "VAULT_ADDR")
        if not addr:
            raise KeyProviderError("transit: set BAO_ADDR (or VAULT_ADDR) to the OpenBao/Vault address")
        url = urlparse(addr)
        if url.scheme == "http" and not is_loopback(url.hostname):
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
            refused: Exception | None = None
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
                    raise ProviderUnavailable(f"transit: the server is unreachable during {what}") from None
                self._sleep(delay)
                delay *= 2
            except hx.Forbidden:
                if relogged or _env("BAO_TOKEN", "VAULT_TOKEN"):
                    raise ProviderUnavailable(f"transit: permission denied for {what}") from None
                relogged = True
                self._client = None  # AppRole token expired: log in again
            except hx.InvalidPath:
                raise KeyNotFound(f"transit: no such key or mount for {what}") from None
            except hx.InvalidRequest as e:
                refused = self._classify(_server_messages(e), what)
            if refused is not None:
                # Raised outside the handler: the hvac error (whose text holds the whole response,
                # the data keys of a batch's successful items included) is not kept as __context__.
                raise refused
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
            return KeyProviderError(f"transit: the server refused the key's encryption context ({what})")
        return KeyProviderError(f"transit: the server refused {what}")
