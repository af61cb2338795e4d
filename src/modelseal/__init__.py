"""modelseal: encrypt, sign and govern machine-learning model artifacts.

The recipe API::

    import modelseal
    modelseal.seal("model/", "model.sealed", key="prod-kek", context={"env": "prod"})
    with modelseal.open("model.sealed", member="config.json") as f:
        config = f.read()
"""

from __future__ import annotations

from .api import SealResult, open, open_folder, seal, unseal  # noqa: A004
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
    StorageError,
)
from .folder import SealedFolder
from .inspection import inspect
from .rekey import RewrapResult, reencrypt, rewrap

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
    "PolicyDenied",
    "RewrapResult",
    "SealResult",
    "SealedFolder",
    "SealedReader",
    "StorageError",
    "inspect",
    "open",
    "open_folder",
    "reencrypt",
    "rewrap",
    "seal",
    "unseal",
]
