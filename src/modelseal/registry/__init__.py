"""Layer 6, below the loaders: the OCI distribution registry that stores ciphertext only
(docs/registry.md), its metadata store (SQLite/PostgreSQL), its blob stores (folder/S3),
and the client that pushes and pulls sealed artifacts (docs/push-pull.md).

The public API, ``modelseal.registry.push`` and ``modelseal.registry.pull``, is imported
lazily so that ``import modelseal.registry`` costs nothing for a caller that only seals.
"""

from __future__ import annotations

from typing import Any


def push(*args: Any, **kwargs: Any) -> Any:
    """Push a sealed file or folder to ``HOST:PORT/REPO:TAG`` (``registry.transfer.push``)."""
    from modelseal.registry import transfer

    return transfer.push(*args, **kwargs)


def pull(*args: Any, **kwargs: Any) -> Any:
    """Pull ``HOST:PORT/REPO:TAG`` into a local path, verified first (``registry.transfer.pull``)."""
    from modelseal.registry import transfer

    return transfer.pull(*args, **kwargs)


__all__ = ["pull", "push"]
