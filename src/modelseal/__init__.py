"""modelseal: encrypt, sign and govern machine-learning model artifacts.

The recipe API::

    import modelseal
    modelseal.seal("model/", "model.sealed", key="prod-kek", context={"env": "prod"})
    with modelseal.open("model.sealed", member="config.json") as f:
        config = f.read()
    modelseal.seal("model/", "signed.sealed", key="prod-kek", sign_key=modelseal.PemSigner.from_file("k.pem"))
    modelseal.verify_artifact("signed.sealed", modelseal.load_policy("trust.toml"))
"""

from __future__ import annotations

from modelseal.errors import (
    ArtifactError,
    DecryptionError,
    DestinationExists,
    FormatError,
    KeyDisabled,
    KeyNotFound,
    KeyProviderError,
    KeystoreError,
    ModelsealError,
    PolicyDenied,
    RevocationListError,
    Revoked,
    SigningKeyError,
    StorageError,
    VerificationError,
)
from modelseal.format.folder import SealedFolder
from modelseal.format.reader import SealedReader
from modelseal.keys import providers as _providers
from modelseal.keys.providers import KeyProvider
from modelseal.recipes.context import expecting, trust_policy
from modelseal.recipes.inspect import inspect
from modelseal.recipes.opening import open, open_folder  # noqa: A004
from modelseal.recipes.rekey import RewrapResult, reencrypt, rewrap
from modelseal.recipes.seal import SealResult, seal
from modelseal.recipes.sign import sign
from modelseal.recipes.unseal import unseal
from modelseal.recipes.verify import verify_artifact
from modelseal.signing.signers import PemSigner, Signer
from modelseal.signing.trust import TrustPolicy, load_policy
from modelseal.signing.verification import Verdict

__version__ = "0.1.0"


def _broker_provider() -> KeyProvider:
    from modelseal.registry.broker import BrokerProvider

    return BrokerProvider()


# ``broker:NAME`` keys ask the key broker (docs/broker.md); its client is in the registry
# layer (the pinned mutual-TLS transport), above the providers, so it is registered here.
_providers.register("broker", _broker_provider)

__all__ = [
    "ArtifactError",
    "DecryptionError",
    "DestinationExists",
    "FormatError",
    "KeyDisabled",
    "KeyNotFound",
    "KeyProviderError",
    "KeystoreError",
    "ModelsealError",
    "PemSigner",
    "PolicyDenied",
    "RevocationListError",
    "Revoked",
    "RewrapResult",
    "SealResult",
    "SealedFolder",
    "SealedReader",
    "Signer",
    "SigningKeyError",
    "StorageError",
    "TrustPolicy",
    "Verdict",
    "VerificationError",
    "expecting",
    "inspect",
    "load_policy",
    "open",
    "open_folder",
    "reencrypt",
    "rewrap",
    "seal",
    "sign",
    "trust_policy",
    "unseal",
    "verify_artifact",
]
