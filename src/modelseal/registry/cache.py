"""The local ciphertext cache behind ``oci://HOST:PORT/REPO:TAG`` in the loaders.

``fetch`` resolves the reference to its manifest digest (one request: a tag may have moved),
and pulls that digest, verified like any ``pull`` (digests, headers, the trust policy in
force), into ``CACHE/sha256/<hex>``: content-addressed, so a second load of the same digest
costs the one request. The cache holds ciphertext only, as pulled; the loader then opens it
as any sealed path, and verify-on-load checks it again. The cache is never inside
``$MODELSEAL_HOME`` (nor holds it): data stays apart from the keys. A lock per digest keeps
two processes from pulling the same artifact at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from modelseal.errors import StorageError
from modelseal.recipes.context import check_keys_apart
from modelseal.registry import settings, transfer
from modelseal.registry.reference import OCI_SCHEME


def is_oci(path: object) -> bool:
    return isinstance(path, str) and path.startswith(OCI_SCHEME)


def fetch(ref: str) -> Path:
    """The cached sealed file or folder for ``oci://...``, pulled first if it is not cached."""
    s = settings.load()
    root = settings.cache_dir(s)
    try:
        (root / "sha256").mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the registry cache {root}: {e.strerror}") from None
    check_keys_apart(root)
    r, digest = transfer.resolve(ref)
    hexd = digest.removeprefix("sha256:")
    dst = root / "sha256" / hexd
    fd = os.open(root / "sha256" / f".{hexd}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.lexists(dst):
            pinned = f"{r.endpoint}/{r.name}@{digest}" if r.endpoint is not None else f"{r.name}@{digest}"
            transfer.pull(pinned, dst)
    finally:
        os.close(fd)
    return dst


__all__ = ["fetch", "is_oci"]
