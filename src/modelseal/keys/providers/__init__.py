"""The registry that picks a key provider by URI scheme (``local:``, ``transit:``, ``pkcs11:``, ``awskms:``).

Provider modules are imported lazily so optional extras stay optional; the interface they
implement is in ``base``, re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from modelseal.errors import KeyProviderError
from modelseal.keys.providers.base import (
    DataKeyGenerator,
    KeyAdmin,
    KeyInfo,
    KeyProvider,
    KeyRef,
    KeyVersionInfo,
    parse_key_uri,
)

__all__ = [
    "DataKeyGenerator",
    "KeyAdmin",
    "KeyInfo",
    "KeyProvider",
    "KeyRef",
    "KeyVersionInfo",
    "canonical_key",
    "parse_key_uri",
    "provider_for",
    "register",
]


def canonical_key(uri: str) -> str:
    """One spelling per key: the transit mount filled in, a pkcs11 key as token and object."""
    ref = parse_key_uri(uri)
    if ref.scheme == "transit":
        from modelseal.keys.providers.transit import canonical_name

        return f"transit:{canonical_name(ref.name)}"
    if ref.scheme == "pkcs11":
        from modelseal.keys.providers.pkcs11 import parse_uri

        return f"pkcs11:{parse_uri(ref.name).key_id}"
    return ref.uri


ProviderFactory = Callable[[], KeyProvider]


def _local() -> KeyProvider:
    from modelseal.keys.providers.local import LocalProvider

    return LocalProvider()


def _transit() -> KeyProvider:
    from modelseal.keys.providers.transit import TransitProvider

    return TransitProvider()


def _pkcs11() -> KeyProvider:
    from modelseal.keys.providers.pkcs11 import Pkcs11Provider

    return Pkcs11Provider()


def _awskms() -> KeyProvider:
    from modelseal.keys.providers.awskms import AwsKmsProvider

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
