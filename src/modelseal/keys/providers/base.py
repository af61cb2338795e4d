"""The key-provider interface: key references, key information, and the three small protocols.

A provider holds key-encryption keys (KEKs) and does two things with them: wrap a data key
bound to an encryption context, and unwrap it under the same context. Lifecycle operations
(create, rotate, disable, destroy) are a second, separate protocol, since some providers (a
KMS key managed elsewhere) do not offer them. Pure data and protocols: no provider imports
another, and none imports the registry in ``modelseal.keys.providers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from modelseal.errors import KeyProviderError
from modelseal.format.header import Recipient


@dataclass(frozen=True)
class KeyRef:
    """A parsed key URI: ``scheme:name`` (a bare name means ``local:name``)."""

    scheme: str
    name: str

    @property
    def uri(self) -> str:
        return f"{self.scheme}:{self.name}"


def parse_key_uri(uri: str) -> KeyRef:
    scheme, sep, name = uri.partition(":")
    if not sep:
        scheme, name = "local", uri
    if not scheme or not name:
        raise KeyProviderError(f"invalid key URI {uri!r}: expected SCHEME:NAME or NAME")
    return KeyRef(scheme.lower(), name)


@dataclass(frozen=True)
class KeyVersionInfo:
    version: int
    created: float
    state: str  # "active", "disabled" or "destroyed"


@dataclass(frozen=True)
class KeyInfo:
    uri: str
    versions: tuple[KeyVersionInfo, ...]
    min_decryption_version: int

    @property
    def latest(self) -> int:
        return max(v.version for v in self.versions)


@runtime_checkable
class KeyProvider(Protocol):
    """Wrap and unwrap data keys. ``context`` is the canonical encryption context."""

    scheme: str

    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient: ...

    def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes: ...


@runtime_checkable
class DataKeyGenerator(Protocol):
    """Providers that make data keys themselves (AWS KMS ``GenerateDataKey``)."""

    def generate(self, name: str, context: tuple[tuple[str, str], ...]) -> tuple[bytes, Recipient]: ...


@runtime_checkable
class KeyResolver(Protocol):
    """Providers whose keys have several spellings (AWS KMS: key id, key ARN, alias, alias
    ARN): ``canonical_name`` returns the one identity every comparison uses."""

    def canonical_name(self, name: str) -> str: ...


@runtime_checkable
class KeyAdmin(Protocol):
    """Key lifecycle, for providers that manage their own keys."""

    def create(self, name: str) -> KeyInfo: ...

    def rotate(self, name: str) -> KeyInfo: ...

    def set_version_state(self, name: str, version: int, state: str) -> KeyInfo: ...

    def destroy(self, name: str, version: int | None) -> KeyInfo: ...

    def list(self) -> list[KeyInfo]: ...
