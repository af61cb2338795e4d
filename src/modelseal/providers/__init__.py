"""Key-provider interface and the registry that picks a provider by URI scheme.

A provider holds key-encryption keys (KEKs) and does two things with them:
wrap a data key bound to an encryption context, and unwrap it under the same
context. Lifecycle operations (create, rotate, disable, destroy) are a second,
separate protocol, since some providers (a KMS key managed elsewhere) do not
offer them. Provider modules are imported lazily so optional extras stay
optional.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import KeyProviderError
from ..header import Recipient


@dataclass(frozen=True)
class KeyRef:
    """A parsed key URI: ``scheme:name`` (a bare name means ``local:name``)."""

    scheme: str
    name: str

    @property
    def uri(self) -> str:
        return f"{self.scheme}:{self.name}"


def canonical_key(uri: str) -> str:
    """One spelling per key: the transit mount filled in, a pkcs11 key as token and object."""
    ref = parse_key_uri(uri)
    if ref.scheme == "transit":
        from .transit import canonical_name

        return f"transit:{canonical_name(ref.name)}"
    if ref.scheme == "pkcs11":
        from .pkcs11 import parse_uri

        return f"pkcs11:{parse_uri(ref.name).key_id}"
    return ref.uri


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
class KeyAdmin(Protocol):
    """Key lifecycle, for providers that manage their own keys."""

    def create(self, name: str) -> KeyInfo: ...

    def rotate(self, name: str) -> KeyInfo: ...

    def set_version_state(self, name: str, version: int, state: str) -> KeyInfo: ...

    def destroy(self, name: str, version: int | None) -> KeyInfo: ...

    def list(self) -> list[KeyInfo]: ...


ProviderFactory = Callable[[], KeyProvider]


def _local() -> KeyProvider:
    from .local import LocalProvider

    return LocalProvider()


def _transit() -> KeyProvider:
    from .transit import TransitProvider

    return TransitProvider()


def _pkcs11() -> KeyProvider:
    from .pkcs11 import Pkcs11Provider

    return Pkcs11Provider()


def _awskms() -> KeyProvider:
    from .awskms import AwsKmsProvider

    return AwsKmsProvider()


_FACTORIES: dict[str, ProviderFactory] = {"local": _local, "transit": _transit, "pkcs11": _pkcs11, "awskms": _awskms}


def register(scheme: str, factory: ProviderFactory) -> None:
    _FACTORIES[scheme] = factory


def provider_for(scheme: str, cache: Mapping[str, KeyProvider] | None = None) -> KeyProvider:
    if cache is not None and scheme in cache:
        return cache[scheme]
    try:
        factory = _FACTORIES[scheme]
    except KeyError:
        raise KeyProviderError(
            f"no key provider for scheme {scheme!r} (known: {', '.join(sorted(_FACTORIES))})"
        ) from None
    return factory()
