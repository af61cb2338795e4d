"""The boundary in front of every key provider.

``KeyService`` is the one place that calls providers. Like python-tuf's
``FetcherInterface.fetch`` around ``_fetch``, each operation here normalises
whatever a backend raises into the modelseal error tree and emits one audit
event (success or failure) per key operation. Recipes never call a provider
directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .audit import AuditEvent, AuditSink, JsonLinesSink
from .errors import KeyProviderError, ModelsealError
from .header import Recipient
from .keystore import modelseal_home
from .providers import KeyAdmin, KeyInfo, KeyProvider, parse_key_uri, provider_for

T = TypeVar("T")


def default_sink() -> AuditSink:
    home = modelseal_home()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return JsonLinesSink(Path(home) / "audit.jsonl")


class KeyService:
    def __init__(self, sink: AuditSink | None = None, providers: dict[str, KeyProvider] | None = None) -> None:
        self._sink = sink
        self._providers: dict[str, KeyProvider] = dict(providers or {})

    @property
    def sink(self) -> AuditSink:
        if self._sink is None:
            self._sink = default_sink()
        return self._sink

    def provider(self, scheme: str) -> KeyProvider:
        if scheme not in self._providers:
            self._providers[scheme] = provider_for(scheme)
        return self._providers[scheme]

    def admin(self, scheme: str) -> KeyAdmin:
        p = self.provider(scheme)
        if not isinstance(p, KeyAdmin):
            raise KeyProviderError(f"the {scheme}: provider does not manage key lifecycle here")
        return p

    def _call(
        self, op: str, key: str, fn: Callable[[], T], version: int | None = None, artifact: str | None = None
    ) -> T:
        try:
            result = fn()
        except ModelsealError as e:
            self.sink.emit(AuditEvent(op, key, type(e).__name__, version, artifact))
            raise
        except Exception as e:  # a backend's own exception: normalised, message not echoed
            self.sink.emit(AuditEvent(op, key, "KeyProviderError", version, artifact))
            raise KeyProviderError(f"key provider failed during {op} of {key} ({type(e).__name__})") from None
        if isinstance(result, Recipient):
            version = result.key_version
        self.sink.emit(AuditEvent(op, key, "ok", version, artifact))
        return result

    def wrap(
        self,
        key_uri: str,
        dek: bytes,
        context: tuple[tuple[str, str], ...],
        artifact: str | None = None,
        op: str = "wrap",
    ) -> Recipient:
        ref = parse_key_uri(key_uri)
        return self._call(
            op, ref.uri, lambda: self.provider(ref.scheme).wrap(ref.name, dek, context), artifact=artifact
        )

    def unwrap(
        self,
        recipient: Recipient,
        context: tuple[tuple[str, str], ...],
        artifact: str | None = None,
        op: str = "unwrap",
    ) -> bytes:
        uri = f"{recipient.scheme}:{recipient.key_id}"
        return self._call(
            op, uri, lambda: self.provider(recipient.scheme).unwrap(recipient, context), recipient.key_version, artifact
        )

    def create(self, key_uri: str) -> KeyInfo:
        ref = parse_key_uri(key_uri)
        return self._call("create", ref.uri, lambda: self.admin(ref.scheme).create(ref.name), 1)

    def rotate(self, key_uri: str) -> KeyInfo:
        ref = parse_key_uri(key_uri)
        info = self._call("rotate", ref.uri, lambda: self.admin(ref.scheme).rotate(ref.name))
        return info

    def set_state(self, key_uri: str, version: int, state: str) -> KeyInfo:
        ref = parse_key_uri(key_uri)
        op = "disable" if state == "disabled" else "enable"
        return self._call(
            op, ref.uri, lambda: self.admin(ref.scheme).set_version_state(ref.name, version, state), version
        )

    def destroy(self, key_uri: str, version: int | None) -> KeyInfo:
        ref = parse_key_uri(key_uri)
        return self._call("destroy", ref.uri, lambda: self.admin(ref.scheme).destroy(ref.name, version), version)

    def list(self, scheme: str = "local") -> list[KeyInfo]:
        return self.admin(scheme).list()
