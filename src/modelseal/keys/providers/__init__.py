"""The registry that picks a key provider by URI scheme (``local:``, ``transit:``, ``pkcs11:``, ``awskms:``,
``recovery:`` (the offline recovery key);
``broker:``, the key broker's client in ``registry.broker``, is registered by the facade),
and the two ways a key gets its canonical identity: from an operator's key URI
(``canonical_key``) and from a recipient read from an artifact (``recipient_key``).

Provider modules are imported lazily so optional extras stay optional; the interface they
implement is in ``base``, re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from modelseal.errors import KeyProviderError
from modelseal.keys.providers.base import (
    DataKeyGenerator,
    KeyAdmin,
    KeyInfo,
    KeyProvider,
    KeyRef,
    KeyResolver,
    KeyVersionInfo,
    parse_key_uri,
)

__all__ = [
    "KEY_NAME",
    "DataKeyGenerator",
    "KeyAdmin",
    "KeyInfo",
    "KeyProvider",
    "KeyRef",
    "KeyResolver",
    "KeyVersionInfo",
    "canonical_key",
    "parse_key_uri",
    "provider_for",
    "recipient_key",
    "register",
]

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a keystore key's name, and a broker key's


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


def recipient_key(scheme: str, key_id: str) -> str:
    """The canonical identity of a recipient read from an artifact, for comparisons only.

    The key id is untrusted until a key opens the artifact, so it is parsed the way a
    provider's ``unwrap`` parses it, never as an operator's key URI: a pkcs11 key id with
    anything but ``token`` and ``object`` (a ``module-path=``, a ``pin-source=``) is
    refused, a transit name must be on an allowed mount, a local name must be a keystore
    name. The result is compared with the identities of the operator's own key URIs; it
    is never handed to a provider as a key to wrap to.
    """
    if scheme == "transit":
        from modelseal.keys.providers.transit import canonical_name

        return f"transit:{canonical_name(key_id)}"
    if scheme == "pkcs11":
        from modelseal.keys.providers.pkcs11 import parse_uri

        return f"pkcs11:{parse_uri(key_id, from_artifact=True).key_id}"
    if scheme == "awskms":
        from modelseal.keys.providers.awskms import check_key_id

        return f"awskms:{check_key_id(key_id)}"
    if scheme == "local" and not KEY_NAME.fullmatch(key_id):
        raise KeyProviderError("a local recipient must name a keystore key of [A-Za-z0-9._-]")
    if scheme == "broker" and not KEY_NAME.fullmatch(key_id):
        raise KeyProviderError("a broker recipient must name a broker key of [A-Za-z0-9._-]")
    if scheme == "recovery" and not KEY_NAME.fullmatch(key_id):
        raise KeyProviderError("a recovery recipient must name a recovery key of [A-Za-z0-9._-]")
    return f"{scheme}:{key_id}"


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


def _recovery() -> KeyProvider:
    from modelseal.keys.providers.recovery import RecoveryProvider

    return RecoveryProvider()


_FACTORIES: dict[str, ProviderFactory] = {
    "local": _local,
    "transit": _transit,
    "pkcs11": _pkcs11,
    "awskms": _awskms,
    "recovery": _recovery,
}


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
