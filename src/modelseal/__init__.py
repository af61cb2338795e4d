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

from .api import SealResult, expecting, open, open_folder, seal, sign, trust_policy, unseal  # noqa: A004
from .artifact import SealedReader
from .errors import (
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
from .folder import SealedFolder
from .inspection import inspect
from .rekey import RewrapResult, reencrypt, rewrap
from .signing import PemSigner, Signer
from .trust import TrustPolicy, load_policy
from .verification import Verdict, verify_artifact

__version__ = "0.1.0"

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
