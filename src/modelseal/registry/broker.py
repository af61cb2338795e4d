"""``broker:NAME``: the key provider that asks the key broker (``modelseal serve``,
docs/broker.md) over its pinned mutual-TLS API. The client holds no KMS credential: the
server wraps and unwraps with its own providers, after deciding on the caller's
certificate identity.

Settings (``registry.apiclient``): ``[broker] server = "HOST:PORT"`` in config.toml (or
``MODELSEAL_BROKER``, else the ``[registry]`` endpoints), the certificate folder and pins of
``[broker]``, else ``[registry]``. Data
keys travel base64 inside the mutual-TLS connection only, and never appear in an error.
Besides ``KeyProvider`` and ``KeyAdmin`` it has the batched ``unwrap_many`` and
``rewrap_many`` rotation uses (``unwrap_each``/``rewrap_each`` give each item its own
result): the server rewraps to the newest version, and no data key is sent back for it.
Lifecycle operations need a TOTP code (step-up MFA): asked on the terminal, or read as one
line of stdin when it is not one, never from argv or the environment.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from modelseal.errors import (
    AccessDenied,
    ApprovalRequired,
    DecryptionError,
    GovernanceError,
    KeyDisabled,
    KeyNotFound,
    KeyProviderError,
    ModelsealError,
    PolicyDenied,
    ProviderUnavailable,
    RegistryError,
)
from modelseal.format.header import MAX_WRAPPED, Recipient
from modelseal.keys.providers import KEY_NAME, KeyInfo, KeyVersionInfo
from modelseal.keys.service import printable
from modelseal.registry.apiclient import ApiClient

SCHEME = "broker"
PREFIX = "/modelseal/v1/keys"
BATCH = 1000  # items per request: the most the server takes (one decision and one audit event each)
MAX_BATCH_BYTES = 768 << 10  # and a body under the server's 1 MiB
T = TypeVar("T")
Context = tuple[tuple[str, str], ...]
Otp = Callable[[str, str], str]
_ERRORS: dict[str, Callable[[str], ModelsealError]] = {
    "DECRYPTION_FAILED": lambda _m: DecryptionError(),
    "KEY_UNKNOWN": KeyNotFound,
    "KEY_DISABLED": KeyDisabled,
    "UNAVAILABLE": ProviderUnavailable,
    "DENIED": PolicyDenied,
}


class BrokerDenied(AccessDenied, KeyProviderError):
    """The broker refused this caller (403, 429): ``AccessDenied`` (exit 17), and a key
    provider's failure too, so opening an artifact goes on to its other recipients."""


_STATUS = re.compile(r"[A-Z]+ [^ :]+: (\d{3}) ")
_BY_STATUS: dict[int, Callable[[str], ModelsealError]] = {
    404: KeyNotFound,
    409: KeyDisabled,
    422: lambda _m: DecryptionError(),
}


def ask_otp(action: str, name: str) -> str:
    """A TOTP code for ``action`` on broker key ``name``: from the terminal, or one line of stdin."""
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass(f"TOTP code for {action} of broker:{name}: ").strip()
    line = sys.stdin.readline(64) if sys.stdin is not None else ""
    if not line.strip():
        raise KeyProviderError(f"{action} of broker:{name} needs a TOTP code (terminal, or one line of stdin)")
    return line.strip()


def _check_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise KeyProviderError(f"invalid broker key name {printable(name[:80])!r}: 1-128 of [A-Za-z0-9._-]")
    return name


def _text(value: object) -> str:
    return printable(value[:300]) if isinstance(value, str) else "(no reason given)"


def _b64(value: object, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * (limit // 3 + 2):
        raise KeyProviderError("the key broker answered with a malformed key")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyProviderError("the key broker answered with a malformed key") from None
    if not 1 <= len(data) <= limit:
        raise KeyProviderError("the key broker answered with a malformed key")
    return data


def _version(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KeyProviderError("the key broker answered with a malformed key version")
    return value


def _item_error(error: object) -> ModelsealError:
    doc = error if isinstance(error, dict) else {}
    code, message = doc.get("code"), _text(doc.get("message"))
    make = _ERRORS.get(code, KeyProviderError) if isinstance(code, str) else KeyProviderError
    return make(f"key broker: {message}")


def key_info(name: str, doc: object) -> KeyInfo:
    """A ``KeyInfo`` (``broker:NAME``) from the broker's description of a key."""
    if not isinstance(doc, dict) or not isinstance(doc.get("versions"), list):
        err = doc.get("error") if isinstance(doc, dict) else None
        raise _item_error(err) if err else KeyProviderError("the key broker answered without key versions")
    versions = []
    for v in doc["versions"]:
        if not isinstance(v, dict) or not isinstance(v.get("created"), int | float):
            raise KeyProviderError("the key broker answered with a malformed key version")
        state = v.get("state") if v.get("state") in ("active", "disabled", "destroyed") else "disabled"
        versions.append(KeyVersionInfo(_version(v.get("version")), float(v["created"]), str(state)))
    if not versions:
        raise KeyProviderError(f"broker:{name} has no versions")
    minimum = doc.get("min_decryption_version", 1)
    return KeyInfo(f"{SCHEME}:{name}", tuple(versions), minimum if isinstance(minimum, int) else 1)


class BrokerProvider:
    """``KeyProvider`` and ``KeyAdmin`` for ``broker:NAME`` over the broker's API."""

    scheme = SCHEME

    def __init__(
        self,
        client_factory: Callable[[], Any] | None = None,
        otp: Otp | None = None,
        batch: int = BATCH,
    ) -> None:
        self._factory = client_factory or ApiClient.from_settings
        self._client: Any = None
        self._lock = threading.Lock()
        self._otp = otp or ask_otp
        self.batch = max(1, min(batch, 1000))

    # -- transport -------------------------------------------------------------------

    def _api(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; the broker's refusals keep their class (an ``AccessDenied``, an
        ``ApprovalRequired``), an unreachable broker is ``ProviderUnavailable``."""
        try:
            reply = self._api().call(method, path, body)
        except RegistryError as e:
            raise ProviderUnavailable(f"the key broker is unavailable: {e}") from None
        except ApprovalRequired:
            raise
        except AccessDenied as e:
            raise BrokerDenied(str(e)) from None
        except GovernanceError as e:
            # ApiClient's other 4xx say "METHOD PATH: STATUS REASON" (no status attribute)
            m = _STATUS.match(str(e))
            make = _BY_STATUS.get(int(m.group(1))) if m else None
            if make is None:
                raise
            raise make(f"key broker: {str(e)[m.end() if m else 0 :]}") from None
        if not isinstance(reply, dict):
            raise KeyProviderError("the key broker answered with something other than a JSON object")
        return reply

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- wrap / unwrap ---------------------------------------------------------------

    def wrap(self, name: str, dek: bytes, context: Context) -> Recipient:
        body = {"key": _check_name(name), "dek": base64.b64encode(dek).decode(), "context": dict(context)}
        reply = self._call("POST", f"{PREFIX}/wrap", body)
        if reply.get("key") != name:
            raise KeyProviderError("the key broker answered for another key")
        return Recipient(SCHEME, name, _version(reply.get("version")), _b64(reply.get("wrapped"), MAX_WRAPPED))

    def unwrap(self, recipient: Recipient, context: Context) -> bytes:
        return self.unwrap_many([recipient], context)[0]

    def _batches(self, recipients: Sequence[Recipient], contexts: Sequence[Context]) -> list[list[int]]:
        out: list[list[int]] = []
        size = 0
        for i, r in enumerate(recipients):
            cost = 4 * len(r.wrapped) // 3 + len(r.key_id) + sum(len(k) + len(v) + 8 for k, v in contexts[i]) + 80
            if not out or len(out[-1]) >= self.batch or size + cost > MAX_BATCH_BYTES:
                out.append([])
                size = 0
            out[-1].append(i)
            size += cost
        return out

    def _each(
        self,
        route: str,
        recipients: Sequence[Recipient],
        contexts: Sequence[Context],
        parse: Callable[[int, dict[str, Any]], T],
    ) -> list[T | ModelsealError]:
        if len(contexts) != len(recipients):
            raise KeyProviderError("one context per recipient is needed")
        results: list[T | ModelsealError] = []
        for idx in self._batches(recipients, contexts):
            items = []
            for i in idx:
                r = recipients[i]
                if r.scheme != SCHEME:
                    raise DecryptionError()
                items.append(
                    {
                        "key": _check_name(r.key_id),
                        "version": r.key_version,
                        "wrapped": base64.b64encode(r.wrapped).decode(),
                        "context": dict(contexts[i]),
                    }
                )
            got = self._call("POST", f"{PREFIX}/{route}", {"items": items}).get("results")
            if not isinstance(got, list) or len(got) != len(idx):  # never shift keys between artifacts
                raise KeyProviderError(f"the key broker's {route} answered the wrong number of results")
            for i, item in zip(idx, got, strict=True):
                if not isinstance(item, dict):
                    raise KeyProviderError(f"the key broker's {route} answered a malformed result")
                results.append(_item_error(item["error"]) if "error" in item else parse(i, item))
        return results

    def unwrap_each(self, recipients: Sequence[Recipient], contexts: Sequence[Context]) -> list[bytes | ModelsealError]:
        """Each recipient's data key, or that item's error (batched requests)."""

        def dek(_i: int, item: dict[str, Any]) -> bytes:
            key = _b64(item.get("dek"), 32)
            if len(key) != 32:
                raise KeyProviderError("the key broker answered with a malformed key")
            return key

        return self._each("unwrap", recipients, contexts, dek)

    def rewrap_each(
        self, recipients: Sequence[Recipient], contexts: Sequence[Context]
    ) -> list[Recipient | ModelsealError]:
        """Each recipient rewrapped by the server to the newest backing version, or that item's error."""

        def fresh(i: int, item: dict[str, Any]) -> Recipient:
            name = recipients[i].key_id
            return Recipient(SCHEME, name, _version(item.get("version")), _b64(item.get("wrapped"), MAX_WRAPPED))

        return self._each("rewrap", recipients, contexts, fresh)

    def unwrap_many(
        self, recipients: Sequence[Recipient], context: Context, contexts: Sequence[Context] | None = None
    ) -> list[bytes]:
        return _all(self.unwrap_each(recipients, list(contexts or [context] * len(recipients))))

    def rewrap_many(
        self, recipients: Sequence[Recipient], context: Context, contexts: Sequence[Context] | None = None
    ) -> list[Recipient]:
        return _all(self.rewrap_each(recipients, list(contexts or [context] * len(recipients))))

    # -- lifecycle (step-up MFA on every change) -------------------------------------

    def _change(self, name: str, op: str, body: dict[str, Any]) -> KeyInfo:
        _check_name(name)
        otp = self._otp(f"key {op}", name)
        return key_info(name, self._call("POST", f"{PREFIX}/{name}/{op}", {**body, "otp": otp}))

    def create(self, name: str) -> KeyInfo:
        otp = self._otp("key create", _check_name(name))
        return key_info(name, self._call("POST", PREFIX, {"name": name, "otp": otp}))

    def rotate(self, name: str) -> KeyInfo:
        return self._change(name, "rotate", {})

    def set_version_state(self, name: str, version: int, state: str) -> KeyInfo:
        return self._change(name, "disable" if state == "disabled" else "enable", {"version": version})

    def destroy(self, name: str, version: int | None) -> KeyInfo:
        """Queued for two officers' approval: raises ``ApprovalRequired`` naming the request."""
        return self._change(name, "destroy", {"version": version})

    def info(self, name: str) -> KeyInfo:
        return key_info(name, self._call("GET", f"{PREFIX}/{_check_name(name)}"))

    def list(self) -> list[KeyInfo]:
        keys = self._call("GET", PREFIX).get("keys")
        if not isinstance(keys, list):
            raise KeyProviderError("the key broker answered without a key list")
        out = []
        for k in keys:
            name = k.get("name") if isinstance(k, dict) else None
            if isinstance(name, str) and KEY_NAME.fullmatch(name) and isinstance(k.get("versions"), list):
                out.append(key_info(name, k))
        return out


def _all(results: Sequence[T | ModelsealError]) -> list[T]:
    out: list[T] = []
    for r in results:
        if isinstance(r, ModelsealError):
            raise r
        out.append(r)
    return out


__all__ = ["BATCH", "SCHEME", "BrokerDenied", "BrokerProvider", "ask_otp", "key_info"]
